"""Offline throughput of the paged engine against transformers ``generate``, in one run.

    python benchmarks/throughput.py [--workloads A,M,B] [--dtypes float32,bfloat16]
                                    [--tps 1,2] [--out benchmarks/.cache]

Model: llama-110m shape (hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048,
vocab 32000, untied), random weights, stored in each of ``--dtypes`` (the same seed: a
bfloat16 checkpoint is the float32 one rounded), EOS ignored. transformers runs in the
checkpoint's dtype; shardserve takes it with dtype auto (16-bit weights read into float32
registers by the native kernels: runtime/precision.py), and the ratio of each 16-bit row to
the float32 row of the same workload and tp is printed too. shardserve runs at tp=1 on
``cpu:1`` (one process, 2 threads) and at tp=2 on ``cpu:2`` (two processes, 1 thread each):
both use the same 2 cores transformers uses with its 2 threads.

- A, uniform: 64 requests x (128 random prompt tokens, 128 output tokens). Baseline: one
  static batch of 64 through transformers.
- M, mixed: 64 requests, prompt lengths uniform in 16..512, output lengths uniform in 16..256
  (seeded); only the tokens each request asked for count. Baseline: static batches of 16 in
  arrival order (left-padded; each batch runs to its longest output).
- B, latency: one request, 128 in, 128 out, end to end. Baseline: transformers on it alone.

The machine's limits are measured in the same run (benchmarks/machine.py): float32 GEMM
FLOP/s for A and M, where a generated or prompt token costs 2 x (matmul parameters) FLOPs
(attention's share is left out, so the fractions slightly understate the work); memory read
bandwidth for B, where each decode step streams every weight once.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch

from shardserve import LLM, SamplingParams, test_models


def workload(name: str) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    if name == "A":
        lens, outs = [128] * 64, [128] * 64
    elif name == "M":
        lens = [rng.randint(16, 512) for _ in range(64)]
        outs = [rng.randint(16, 256) for _ in range(64)]
    else:
        lens, outs = [128], [128]
    prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in lens]
    return prompts, outs


def run_shardserve(llm: LLM, prompts, outs) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outs]
    t0 = time.perf_counter()
    res = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t0
    assert [len(r.outputs[0].token_ids) for r in res] == outs
    return dt


def run_hf(model, prompts, outs, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, ns = prompts[i:i + batch], outs[i:i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(ns),
                           min_new_tokens=max(ns), do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="A,M,B")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--tps", default="1,2")
    ap.add_argument("--out", default=str(Path(__file__).parent / ".cache"))
    args = ap.parse_args()
    names, tps = args.workloads.split(","), [int(t) for t in args.tps.split(",")]

    from machine import gemm_flops, memory_bandwidth

    flops, bw = gemm_flops(), memory_bandwidth()
    print(f"machine: float32 GEMM {flops / 1e9:.0f} GFLOP/s, memory read {bw / 1e9:.1f} GB/s "
          f"({torch.get_num_threads()} threads)", flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run_dtype(Path(args.out), dtype, names, tps, flops, bw)
    print("\n| workload | dtype | tp | transformers tok/s | shardserve tok/s | speedup | "
          "machine fraction (shardserve / transformers) | steps | per-step control overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = (f"{r['bandwidth_fraction']:.0%} / {r['transformers_bandwidth_fraction']:.0%} "
                "of memory bandwidth" if r["workload"] == "B" else
                f"{r['gemm_fraction']:.0%} / {r['transformers_gemm_fraction']:.0%} of "
                "float32 GEMM")
        print(f"| {r['workload']} | {r['dtype']} | {r['tp']} | {r['transformers_tok_s']:.1f} | "
              f"{r['shardserve_tok_s']:.1f} | {r['speedup']:.2f}x | {frac} | {r['steps']} | "
              f"IPC {r['ipc_overhead_share']:.1%}, scheduling {r['engine_cpu_share']:.1%}, "
              f"collectives {r['collectives_share']:.1%} |")
    f32 = {(r["workload"], r["tp"]): r["shardserve_tok_s"] for r in rows
           if r["dtype"] == "float32"}
    for r in rows:
        if r["dtype"] != "float32" and (r["workload"], r["tp"]) in f32:
            print(f"{r['workload']} tp={r['tp']}: shardserve {r['dtype']} / shardserve float32 "
                  f"= {r['shardserve_tok_s'] / f32[(r['workload'], r['tp'])]:.2f}x")


def run_dtype(root: Path, dtype: str, names, tps, flops, bw) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from shardserve.config import ModelConfig
    from shardserve.planner.memory import weight_params_per_device

    path = root / ("llama-110m-random-f32" if dtype == "float32" else f"llama-110m-{dtype}")
    if not (path / "config.json").is_file():
        test_models.write(path, "llama", "llama-110m", seed=0, dtype=dtype, tokenizer=False)
    spec = ModelConfig(str(path)).spec
    matmul_params = weight_params_per_device(spec, 1) - spec.vocab_size * spec.hidden_size
    weight_bytes = torch.tensor([], dtype=getattr(torch, dtype)).element_size() * \
        weight_params_per_device(spec, 1)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    run_hf(hf, *workload("B"), batch=1)  # warm up
    base = {}
    for name in names:
        prompts, outs = workload(name)
        base[name] = run_hf(hf, prompts, outs, {"A": 64, "M": 16, "B": 1}[name])
        print(f"transformers {dtype} {name}: {sum(outs) / base[name]:.1f} output tok/s",
              flush=True)
    del hf
    gc.collect()
    rows = []
    for tp in tps:
        rows += [{"dtype": dtype, **r} for r in run_engine(path, tp, names, base, flops, bw,
                                                           weight_bytes, matmul_params)]
    return rows


def run_engine(path, tp, names, base, flops, bw, weight_bytes, matmul_params) -> list[dict]:
    rows = []
    with LLM(str(path), tensor_parallel_size=tp, devices=f"cpu:{tp}",
             max_model_len=1024) as llm:
        run_shardserve(llm, *workload("B"))  # warm up
        for name in names:
            prompts, outs = workload(name)
            s0 = dict(vars(llm.engine.stats))
            dt = run_shardserve(llm, prompts, outs)
            s1 = vars(llm.engine.stats)
            d = {k: s1[k] - s0[k] for k in s1}
            tokens = sum(outs)
            all_tokens = tokens + sum(map(len, prompts))
            row = {"workload": name, "tp": tp, "shardserve_tok_s": tokens / dt,
                   "transformers_tok_s": tokens / base[name], "speedup": base[name] / dt,
                   "steps": d["steps"], "preemptions": llm.engine.scheduler.num_preemptions,
                   "ipc_overhead_share": (d["step_seconds"] - d["worker_seconds"]) / dt,
                   "engine_cpu_share": d["schedule_seconds"] / dt,
                   "collectives_share": d["comm_seconds"] / dt}
            if name == "B":
                row["bandwidth_fraction"] = (tokens / dt) * weight_bytes / bw
                row["transformers_bandwidth_fraction"] = (tokens / base[name]) * weight_bytes / bw
            else:
                row["gemm_fraction"] = all_tokens * 2 * matmul_params / dt / flops
                row["transformers_gemm_fraction"] = (
                    all_tokens * 2 * matmul_params / base[name] / flops)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
