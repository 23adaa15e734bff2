"""Decode tokens/s at tp=1 and tp=2, batch 1 and 16, on a TinyLlama-shaped model (random
weights, float32), against transformers ``generate`` on the same checkpoint, in one run.

    python benchmarks/tp_scaling.py [--tokens 16] [--out benchmarks/.cache]

Decode rate = generated tokens / time of the decode steps (prefill excluded): for shardserve
the engine's steps after the prefill step; for transformers the difference of two generate
calls (n and 1 new tokens), which cancels its prefill. tp=1 runs twice: on one device of
cpu:2 (one core, the per-core baseline tp=2 scales from) and on cpu:1 (both cores, the
like-for-like comparison with transformers on 2 threads). Also reported: the share of the
decode time rank 0 spent in gloo all-reduce/all-gather, and batch-1 weight streaming as a
fraction of the memory bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from shardserve import LLM, SamplingParams, test_models
from shardserve.planner.memory import weight_bytes_per_device

PROMPT_LEN = 16


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 32000, (batch, PROMPT_LEN), generator=g).tolist()


def shardserve_decode(llm: LLM, tp: int, devices: str, batch: int, tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts(batch)):
        engine.add_request(f"{tokens}-{i}", p, params)
    engine.step()  # prefill: every prompt at once, one token each
    comm0, t0, steps = engine.stats.comm_seconds, time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    return {"system": "shardserve", "tp": tp, "devices": devices, "batch": batch,
            "decode_tok_s": batch * steps / dt, "ms_per_step": 1e3 * dt / steps,
            "comm_share": (engine.stats.comm_seconds - comm0) / dt}


def hf_decode(path: Path, batch: int, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor(prompts(batch))

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)  # warm up
    dt = run(tokens + 1) - run(1)
    return {"system": "transformers", "tp": 1, "devices": f"{torch.get_num_threads()} threads",
            "batch": batch, "decode_tok_s": batch * tokens / dt,
            "ms_per_step": 1e3 * dt / tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16, help="decode steps measured per run")
    ap.add_argument("--out", default=str(Path(__file__).parent / ".cache"))
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    path = Path(args.out) / "tinyllama-random-f32"
    if not (path / "config.json").is_file():
        print(f"writing the TinyLlama-shaped checkpoint to {path} ...", flush=True)
        test_models.write(path, "llama", "tinyllama", seed=0, max_shard_bytes=1 << 30,
                          tokenizer=False)

    from machine import gemm_flops, memory_bandwidth

    bw, flops = memory_bandwidth(), gemm_flops()
    print(f"machine: memory read {bw / 1e9:.1f} GB/s, float32 GEMM {flops / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)", flush=True)
    rows = [hf_decode(path, b, args.tokens) for b in batches]
    gc.collect()
    for r in rows:
        print(json.dumps(r), flush=True)
    for tp, devices in ((1, "cpu:2"), (1, "cpu:1"), (2, "cpu:2")):
        with LLM(str(path), tensor_parallel_size=tp, devices=devices, max_model_len=256,
                 max_num_seqs=max(batches)) as llm:
            for b in batches:
                shardserve_decode(llm, tp, devices, b, 2)  # warm up
                rows.append(shardserve_decode(llm, tp, devices, b, args.tokens))
                print(json.dumps(rows[-1]), flush=True)
    report(rows, path, bw, flops)


def report(rows: list[dict], path: Path, bw: float, flops: float) -> None:
    from shardserve.config import ModelConfig

    spec = ModelConfig(str(path)).spec
    weights = weight_bytes_per_device(spec, 1, "float32")

    def rate(system: str, tp: int, devices: str | None, batch: int) -> float:
        return next(r["decode_tok_s"] for r in rows if r["system"] == system and r["tp"] == tp
                    and r["batch"] == batch and (devices is None or r["devices"] == devices))

    print("\n| system | tp | devices | batch | decode tok/s | ms/step | collectives share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['comm_share']:.1f}%" if "comm_share" in r else "-"
        print(f"| {r['system']} | {r['tp']} | {r['devices']} | {r['batch']} | "
              f"{r['decode_tok_s']:.2f} | {r['ms_per_step']:.0f} | {share} |")
    print()
    for b in sorted({r["batch"] for r in rows}):
        hf = rate("transformers", 1, None, b)
        one_core = rate("shardserve", 1, "cpu:2", b)
        two_core = rate("shardserve", 1, "cpu:1", b)
        tp2 = rate("shardserve", 2, "cpu:2", b)
        print(f"batch {b}: tp=2 / tp=1 (one core per device) = {tp2 / one_core:.2f}x; "
              f"tp=2 / tp=1 (both cores) = {tp2 / two_core:.2f}x; "
              f"tp=1 (both cores) / transformers = {two_core / hf:.2f}x; "
              f"tp=2 / transformers = {tp2 / hf:.2f}x")
    for devices, tp in (("cpu:1", 1), ("cpu:2", 2)):
        achieved = rate("shardserve", tp, devices, 1) * weights
        print(f"batch 1, tp={tp} ({devices}): streams {achieved / 1e9:.1f} GB/s of weights = "
              f"{achieved / bw:.0%} of the measured {bw / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
