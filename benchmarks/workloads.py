"""The benchmark workloads, shared by our runs and the peers' (which import nothing else of
ours: they run in their own virtual environments)."""

from __future__ import annotations

import random


def workload(name: str) -> tuple[list[list[int]], list[int]]:
    """Prompts (token ids, vocabulary 32000) and output lengths of workload A, M or B
    (benchmarks/throughput.py)."""
    rng = random.Random(0)
    if name == "A":
        lens, outs = [128] * 64, [128] * 64
    elif name == "M":
        lens = [rng.randint(16, 512) for _ in range(64)]
        outs = [rng.randint(16, 256) for _ in range(64)]
    elif name == "B":
        lens, outs = [128], [128]
    else:
        raise ValueError(f"unknown workload {name!r}; A, M or B")
    prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in lens]
    return prompts, outs


def cold_prompts(prompt: list[int], n: int) -> list[list[int]]:
    """``n`` prompts as long as ``prompt`` whose first tokens differ from its and from each
    other's: no prefix cache (ours, vLLM's, llama.cpp's reuse of its context) holds any block
    of them, so the time to the first token of each is a whole prefill."""
    return [[3 + (prompt[0] - 3 + 1 + i) % (32000 - 3)] + prompt[1:] for i in range(n)]
