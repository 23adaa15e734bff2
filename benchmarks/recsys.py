"""A DLRM served over KServe v2: queries per second and latency at concurrency 8-64, with
dynamic batching on and off, against the same model unsharded in one process, in one run.

    python benchmarks/recsys.py [--size small] [--samples 8] [--requests 800]
                                [--concurrency 8 16 32 64] [--out r.json]

Model: ``make-test-model --arch dlrm`` (Criteo shape: 13 dense features, 26 tables of 10 to
~110k rows, random weights, float32). A request scores ``--samples`` candidates (one user,
several items: each sample up to 4 ids a feature). Client: tritonclient's HTTP client with
binary tensors, ``concurrency`` threads each sending requests back to back.

- in process, unsharded: the model as one PyTorch module (``nn.EmbeddingBag`` and the same
  MLPs: the reference the parity tests use) called directly, one request at a time: the
  floor a server adds its cost to;
- in process, sharded: ``RecommenderEngine`` at tp=2 (``cpu:2``), one request at a time:
  the cost of the table shards' all-reduce over the fabric (goal: at most 1.3x unsharded at
  one sample); and at tp=1 (``cpu:1``, one worker process, the same kernels): tp=2 / tp=1 is
  the fabric's cost alone. The three take turns by blocks of 25 requests;
- served, tp=2 on ``cpu:2``: dynamic batching on (``max_batch_size`` 32,
  ``max_queue_delay_ms`` 2) and off (``max_batch_size`` 1): QPS and p50/p99 latency per
  concurrency (goals: p99 <= 60 ms at the highest load where it holds; batching >= 2x the
  QPS of batching off at the same p99 bound).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import served  # noqa: E402
from shardserve import test_models  # noqa: E402
from shardserve.config import ModelConfig  # noqa: E402
from tests.distributed.test_dlrm import Reference as Unsharded  # noqa: E402
from tests.e2e.test_server import _free_port  # noqa: E402


def requests(spec, count: int, samples: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        dense = rng.standard_normal((samples, spec.dense_in_features)).astype(np.float32)
        lengths = rng.integers(1, 5, (spec.num_tables, samples)).astype(np.int32)
        values = np.concatenate([rng.integers(0, spec.num_embeddings[f], int(lengths[f].sum()))
                                 for f in range(spec.num_tables)]).astype(np.int64)
        out.append((dense, values, lengths))
    return out


def in_process_ms(fns: dict, reqs: list[tuple], block: int = 25) -> dict[str, dict]:
    """p50/p99 ms of each function over ``reqs``. The functions take turns by blocks of
    ``block`` requests: this machine's speed drifts by 10-20% over a minute, and in turn the
    drift hits all alike, while within a block each runs with its own data in cache, as it
    would one request after another."""
    for fn in fns.values():
        for r in reqs[:20]:
            fn(*r)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for at in range(0, len(reqs), block):
        for name, fn in fns.items():
            for r in reqs[at:at + block]:
                t0 = time.perf_counter()
                fn(*r)
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: {"p50_ms": statistics.median(t), "p99_ms": float(np.percentile(t, 99))}
            for name, t in times.items()}


def load(url: str, reqs: list[tuple], concurrency: int) -> dict:
    import threading

    import tritonclient.http as http

    local = threading.local()  # the client runs on gevent: one client a thread

    def one(r):
        if not hasattr(local, "client"):
            local.client = http.InferenceServerClient(url, connection_timeout=120,
                                                      network_timeout=120)
        inputs = []
        for name, a, kind in (("dense", r[0], "FP32"), ("sparse_values", r[1], "INT64"),
                              ("sparse_lengths", r[2], "INT32")):
            t = http.InferInput(name, list(a.shape), kind)
            t.set_data_from_numpy(a, binary_data=True)
            inputs.append(t)
        t0 = time.perf_counter()
        local.client.infer("ranker", inputs)
        return 1e3 * (time.perf_counter() - t0)

    list(ThreadPoolExecutor(concurrency).map(one, reqs[:2 * concurrency]))  # warm up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, reqs))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "qps": len(reqs) / wall,
            "samples_per_s": len(reqs) * len(reqs[0][0]) / wall,
            "p50_ms": statistics.median(lat), "p99_ms": float(np.percentile(lat, 99))}


def serve(weights: Path, batch: int, delay_ms: float, reqs, loads) -> list[dict]:
    repo = Path(tempfile.mkdtemp())
    (repo / "ranker").mkdir()
    (repo / "ranker" / "model.yaml").write_text(
        f"kind: recommender\nweights: {weights}\ntp: 2\nmax_batch_size: {batch}\n"
        f"max_queue_delay_ms: {delay_ms}\n")
    port = _free_port()
    with served([sys.executable, "-m", "shardserve.cli.main", "serve", "--repository",
                 str(repo), "--devices", "cpu:2", "--port", str(port), "--max-queue", "256"],
                f"http://127.0.0.1:{port}/v2/health/ready"):
        return [load(f"127.0.0.1:{port}", reqs, c) for c in loads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--out")
    args = ap.parse_args()
    from shardserve.engine.recommender import RecommenderEngine
    from shardserve.runtime.devices import parse_devices

    with tempfile.TemporaryDirectory() as tmp:
        weights = test_models.write(Path(tmp) / "dlrm", "dlrm", args.size)
        spec = ModelConfig(str(weights)).spec
        reqs = requests(spec, args.requests, args.samples)
        ones = requests(spec, 300, 1, seed=1)
        torch.set_num_threads(1)
        ref = Unsharded(weights)
        result = {"samples_per_request": args.samples}
        with RecommenderEngine(ModelConfig(str(weights)), 1, parse_devices("cpu:1")) as one, \
                RecommenderEngine(ModelConfig(str(weights)), 2, parse_devices("cpu:2")) as two:
            fns = {"unsharded_in_process": ref, "engine_tp1": one.score,
                   "sharded_in_process_tp2": two.score}
            for key, r in (("one_sample", ones), ("request", reqs[:300])):
                for name, figures in in_process_ms(fns, r).items():
                    result.setdefault(name, {})[key] = figures
        result["served_batching"] = serve(weights, 32, 2, reqs, args.concurrency)
        result["served_no_batching"] = serve(weights, 1, 0, reqs, args.concurrency)
    p50 = {k: result[k]["one_sample"]["p50_ms"] for k in
           ("unsharded_in_process", "engine_tp1", "sharded_in_process_tp2")}
    one = p50["sharded_in_process_tp2"] / p50["unsharded_in_process"]
    result["sharded_over_unsharded_one_sample"] = one
    result["tp2_over_tp1_one_sample"] = p50["sharded_in_process_tp2"] / p50["engine_tp1"]
    print(json.dumps(result, indent=2))
    print()
    print("one sample, p50 ms: " + ", ".join(f"{k} {v:.3f}" for k, v in p50.items()))
    print(f"sharded (tp=2) / unsharded in-process latency at one sample: {one:.2f}x "
          "(goal <= 1.3x); tp=2 / tp=1 through the engine (the fabric alone): "
          f"{result['tp2_over_tp1_one_sample']:.2f}x")
    print("| serving | concurrency | QPS | samples/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for key in ("served_batching", "served_no_batching"):
        for r in result[key]:
            print(f"| {key.removeprefix('served_').replace('_', ' ')} | {r['concurrency']} | "
                  f"{r['qps']:.0f} | {r['samples_per_s']:.0f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
