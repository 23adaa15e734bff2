"""Encoder serving: dynamic batching against one request per pass, and the in-process encoder
against sentence-transformers, all on the real all-MiniLM-L6-v2 weights, in one run.

    python benchmarks/encoder_batching.py [--requests 512] [--concurrency 32]

1. One server (loopback, `cpu:1`) holds the model twice: `dynamic` (max_batch_size 32,
   max_queue_delay_ms 5) and `single` (max_batch_size 1). Clients keep `--concurrency`
   /v1/embeddings requests in flight (one sentence each) over kept-open connections, from one
   asyncio thread; we report requests/s and latency percentiles for each, one after the other.
2. In this process: `LLM.embed` (batches of 32, grouped by length) against
   `SentenceTransformer.encode(batch_size=32)` (which also sorts by length) on the same
   sentences, 2 threads each, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardserve import LLM, test_models  # noqa: E402
from tests.e2e.test_server import _free_port, _start, _stop  # noqa: E402


def sentences(n: int) -> list[str]:
    words = (Path(test_models.__file__).parent / "data" / "corpus.txt").read_text().split()
    return [" ".join(words[(7 * i) % 300:(7 * i) % 300 + 6 + i % 10]) for i in range(n)]


def load(port: int, model: str, texts: list[str], concurrency: int) -> dict:
    """``concurrency`` clients, each with one HTTP/1.1 connection kept open (as load generators
    and client pools do, Triton's perf_analyzer included), sending the next request as soon as
    its answer arrives. One asyncio thread with the requests encoded up front: this machine
    has 2 cores for server and clients together, and 32 blocking client threads cost more CPU
    than the server's whole request handling (measured with py-spy)."""
    bodies = [json.dumps({"model": model, "input": t}).encode() for t in texts]
    requests = [(f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n"
                 ).encode() + b for b in bodies]
    latencies: list[float] = []

    async def client(queue: asyncio.Queue) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not queue.empty():
                req = queue.get_nowait()
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                if status != b"200":
                    raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    async def run() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(queue) for _ in range(concurrency)))
        return time.perf_counter() - t0

    dt = asyncio.run(run())
    ms = np.array(latencies) * 1e3
    return {"model": model, "requests_per_s": len(texts) / dt,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    folder = test_models.minilm_folder()
    texts = sentences(args.requests)
    repo = Path(tempfile.mkdtemp())
    for name, size in (("dynamic", 32), ("single", 1)):
        (repo / name).mkdir()
        (repo / name / "model.yaml").write_text(
            f"kind: encoder\nweights: {folder}\nmax_batch_size: {size}\n"
            "max_queue_delay_ms: 5\n")
    port = _free_port()
    server = _start(["--repository", str(repo), "--devices", "cpu:1"], port)
    try:
        rows = []
        for model in ("dynamic", "single"):
            load(port, model, texts[:64], args.concurrency)  # warm up
            rows.append(load(port, model, texts, args.concurrency))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        _stop(server)

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    st = SentenceTransformer(folder, device="cpu")
    st.encode(texts[:64], batch_size=32)
    t0 = time.perf_counter()
    st.encode(texts, batch_size=32)
    st_rate = len(texts) / (time.perf_counter() - t0)
    with LLM(folder, devices="cpu:1") as llm:  # batches of 32, sorted by length as ST does
        llm.embed(texts[:64])
        t0 = time.perf_counter()
        llm.embed(texts)
        ours_rate = len(texts) / (time.perf_counter() - t0)
    dyn, one = rows
    print(json.dumps({
        "http_dynamic_over_single": dyn["requests_per_s"] / one["requests_per_s"],
        "p99_ms": {"dynamic": dyn["p99_ms"], "single": one["p99_ms"]},
        "in_process_sentences_per_s": {"shardserve": ours_rate,
                                       "sentence_transformers": st_rate},
        "in_process_ratio": ours_rate / st_rate}, indent=2))


if __name__ == "__main__":
    main()
