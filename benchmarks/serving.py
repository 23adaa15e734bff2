"""The server's token throughput against the offline engine on the same requests, in one run.

    python benchmarks/serving.py [--num-requests 64] [--concurrency 16] [--max-tokens 64]

Model: llama-110m shape, random weights, float32, with the test BPE tokenizer, tp=1 on
``cpu:1``, max_num_seqs = the concurrency. The server runs as its own process on loopback and
`shardserve bench` streams the requests to it at the given concurrency; then the same
prompts (tokenized the same way) go through ``LLM.generate`` in this process. The ratio of
output token throughputs bounds the HTTP, JSON and streaming overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardserve import LLM, SamplingParams, test_models  # noqa: E402
from shardserve.bench import http_load  # noqa: E402
from tests.e2e.test_server import _free_port, _start, _stop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--devices", default="cpu:1",
                    help="cpu:1 = the worker on both cores; cpu:2 = the worker on one core, "
                         "the other left to the HTTP server and the load generator")
    ap.add_argument("--out", default=str(Path(__file__).parent / ".cache"))
    args = ap.parse_args()
    path = Path(args.out) / "llama-110m-random-f32-tok"
    if not (path / "config.json").is_file():
        test_models.write(path, "llama", "llama-110m", seed=0)
    repo = Path(tempfile.mkdtemp())
    (repo / "m").mkdir()
    (repo / "m" / "model.yaml").write_text(
        f"weights: {path}\nmax_num_seqs: {args.concurrency}\nmax_model_len: 1024\n")
    port = _free_port()
    server = _start(["--repository", str(repo), "--devices", args.devices], port)
    try:
        http_load.run(f"http://127.0.0.1:{port}", "m", 4, concurrency=4, prompt_len=8,
                      max_tokens=4)  # warm up
        summary = http_load.run(f"http://127.0.0.1:{port}", "m", args.num_requests,
                                concurrency=args.concurrency, prompt_len=args.prompt_words,
                                max_tokens=args.max_tokens)
    finally:
        _stop(server)
    summary.pop("_raw")
    assert summary["failed"] == 0, summary["errors"]
    texts = http_load.make_prompts(args.num_requests, args.prompt_words)  # the same prompts
    with LLM(str(path), tensor_parallel_size=1, devices=args.devices,
             max_num_seqs=args.concurrency, max_model_len=1024) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        llm.generate(texts[:4], SamplingParams(max_tokens=4, temperature=0))  # warm up
        t0 = time.perf_counter()
        outs = llm.generate(texts, params)
        offline_s = time.perf_counter() - t0
    offline = sum(len(o.outputs[0].token_ids) for o in outs) / offline_s
    server_tps = summary["output_token_throughput"]
    keys = ("output_token_throughput", "request_throughput", "ttft", "tpot", "itl", "e2e")
    print(json.dumps({"devices": args.devices, "server": {k: summary[k] for k in keys},
                      "offline_output_token_throughput": offline,
                      "ratio": server_tps / offline}, indent=2))


if __name__ == "__main__":
    main()
