"""Measured engine step times: what the planner's cost model predicts, timed on the engine as
it serves (``LLM``'s engine, its workers, its kernels), so prediction and measurement answer
the same question.

- prefill: the wall time of the engine step that prefills one prompt of ``prompt_len`` tokens
  (the time to first token less queueing), best of ``reps``;
- decode: the median wall time of a decode step of ``batch`` sequences whose context is about
  ``context`` tokens (prompts of ``context`` tokens, then ``steps`` steps timed in which all
  of them decode, after the first such step).

Used by ``shardserve calibrate`` (per-step overhead on a tiny model) and by
``benchmarks/planner_accuracy.py``.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

from shardserve.sampling_params import SamplingParams

_ids = itertools.count()


def _prompt(i: int, n: int, vocab: int) -> list[int]:
    return [3 + (7919 * (i * n + j)) % (vocab - 3) for j in range(n)]


def _prefill_ms(engine, prompt: list[int]) -> float:
    """One prompt alone, one token out: its step is a prefill and nothing else."""
    engine.add_request(f"m{next(_ids)}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return 1e3 * (time.perf_counter() - t0)


def _decode(engine, prompts: list[list[int]], steps: int, chunk: int) -> tuple[float, float]:
    """The median wall time (ms) of ``steps`` decode steps in which every one of the prompts'
    sequences decodes (no prefill in the step), and their mean context. Prompts longer than
    a step's token budget (``chunk``) take several steps to prefill, while the first ones
    already decode: those steps are not timed. The first full decode step, which maps new
    pages, is not timed either."""
    prefill_steps = -(-sum(map(len, prompts)) // chunk) + 1
    params = SamplingParams(max_tokens=prefill_steps + steps + 4, temperature=0,
                            ignore_eos=True)
    out = {f"m{next(_ids)}": 0 for _ in prompts}
    for rid, p in zip(out, prompts, strict=True):
        engine.add_request(rid, p, params)
    prompt_len = sum(map(len, prompts)) / len(prompts)
    times, contexts, full = [], [], 0
    while len(times) < steps and engine.has_unfinished():
        decoding = all(n > 0 for n in out.values())
        t0 = time.perf_counter()
        deltas = engine.step()
        elapsed = time.perf_counter() - t0
        for d in deltas:
            out[d.request_id] += sum(len(s.token_ids) for s in d.seqs)
        if decoding and len(deltas) == len(prompts):
            full += 1
            if full > 1:
                times.append(elapsed)
                contexts.append(prompt_len + sum(out.values()) / len(out) - 1)
    for rid in out:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    if len(times) < steps:
        raise RuntimeError(f"only {len(times)} of {steps} decode steps ran all "
                           f"{len(prompts)} sequences")
    return 1e3 * statistics.median(times), statistics.mean(contexts)


def measure(path: str | Path, tp: int = 1, dtype: str = "auto", prefills: tuple = (128,),
            batches: tuple = (1,), context: int = 128, steps: int = 8, reps: int = 3,
            vocab: int = 32000) -> dict:
    """``{"prefill_ms": {len: ms}, "decode_ms": {batch: ms}, "decode_context": {batch:
    tokens}}`` for the model at ``path`` on ``cpu:tp`` (tp devices splitting this process's
    cores); ``decode_context`` is the mean context of the decode steps timed. Prefix caching
    is off: every prompt is computed in full."""
    from shardserve import LLM

    chunk = max([2048, *prefills])
    longest = max([*prefills, context + steps + 8 + -(-max(batches) * context // chunk)])
    out: dict = {"prefill_ms": {}, "decode_ms": {}, "decode_context": {}}
    with LLM(str(path), tensor_parallel_size=tp, devices=f"cpu:{tp}", dtype=dtype,
             max_num_seqs=max(batches), max_model_len=longest + 8,
             max_num_batched_tokens=chunk, enable_prefix_caching=False) as llm:
        engine = llm.engine
        _decode(engine, [_prompt(0, 16, vocab)], 2, chunk)  # warm-up: kernels, first pages
        for n in prefills:
            out["prefill_ms"][n] = min(_prefill_ms(engine, _prompt(r, n, vocab))
                                       for r in range(reps))
        for b in batches:
            ms, ctx = _decode(engine, [_prompt(i, context, vocab) for i in range(b)], steps,
                              chunk)
            out["decode_ms"][b] = ms
            out["decode_context"][b] = round(ctx, 1)
    return out
