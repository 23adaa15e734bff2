"""Pipeline parallelism on the same cores: decode throughput at pp=2 against pp=1, the
bubble (time a stage sits idle), and the Ray executor's step time against the local one's at
tp=2, all in one run on a llama-110m-shaped model (random weights, float32).

    python benchmarks/pipeline.py [--batches 16 32 64] [--tokens 128] [--no-ray]

pp=1 is one device holding every core (``cpu:1``); pp=2 is two devices of one core each
(``cpu:2``), split as the engine splits by default (even decode work: at batch 64 stage 0
holds the embedding, layers 0-6 and layer 7's attention, stage 1 the rest and the head;
``--split`` sets another), with two micro-batches in flight. ``batch`` prompts of 16 tokens
are added at once and each generates ``tokens`` tokens. Decode throughput = the tokens
generated after every sequence has its first one / the time from then to the end (the
issue's measure); throughput = all generated tokens / the whole wall time, prefill included
(at batch 64 the prefill of 1024 tokens is about a tenth of the run, and in a pipeline its
two micro-batches pass the stages one after the other). A stage's bubble = 1 - (its time
computing) / (the whole run's wall time), where computing is the time inside its steps
less the time it waited for the previous stage's hidden states.

Ray vs local: decode ms per step at tp=2 (``cpu:2``), batch 1 and 16, the local executor's
worker processes against Ray actors in a local Ray instance started by this script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shardserve import LLM, SamplingParams, test_models

PROMPT_LEN = 16


def _prompts(batch: int) -> list[list[int]]:
    return [[3 + (7919 * (i * PROMPT_LEN + j)) % 31000 for j in range(PROMPT_LEN)]
            for i in range(batch)]


def throughput(path: Path, pp: int, batch: int, tokens: int, split: str | None = None) -> dict:
    devices = "cpu:1" if pp == 1 else f"cpu:{pp}"
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    with LLM(str(path), pipeline_parallel_size=pp, devices=devices, max_num_seqs=batch,
             pipeline_split=split if pp > 1 else None,
             max_model_len=PROMPT_LEN + tokens + 16) as llm:
        llm.generate(prompt_token_ids=_prompts(2), sampling_params=SamplingParams(
            max_tokens=4, ignore_eos=True))  # warm-up
        engine = llm.engine
        before = engine.executor.collective_rpc("stats")
        for i, p in enumerate(_prompts(batch)):
            engine.add_request(f"r{i}", p, params)
        t0 = time.perf_counter()
        started: set[str] = set()
        decode_start, decoded = None, 0  # when every sequence had its first token; since then
        while engine.has_unfinished():
            for delta in engine.step():
                n = sum(len(s.token_ids) for s in delta.seqs)
                if decode_start is not None:
                    decoded += n
                elif n:
                    started.add(delta.request_id)
            if decode_start is None and len(started) == batch:
                decode_start = time.perf_counter()
        end = time.perf_counter()
        after = engine.executor.collective_rpc("stats")
        stages = [st.holds for st in engine.stages]
    bubbles = []
    for b, a in zip(before, after, strict=True):
        busy = (a["step_seconds"] - b["step_seconds"]) - \
            (a["pipe_wait_seconds"] - b["pipe_wait_seconds"])
        bubbles.append(round(1 - busy / (end - t0), 3))
    return {"pp": pp, "devices": devices, "batch": batch, "stages": stages,
            "decode_tok_s": decoded / (end - decode_start),
            "tok_s": batch * tokens / (end - t0), "wall_s": end - t0,
            "bubble_per_stage": bubbles}


def step_ms(path: Path, executor: str, batch: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=2, devices="cpu:2", executor=executor,
             max_num_seqs=batch) as llm:
        engine = llm.engine
        for i, p in enumerate(_prompts(batch)):
            engine.add_request(f"w{i}", p, SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        for i, p in enumerate(_prompts(batch)):
            engine.add_request(f"r{i}", p, params)
        engine.step()  # the prefill
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return 1e3 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[16, 32, 64],
                    help="pp=2 vs pp=1 at these batches (none: only the Ray comparison)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/.cache")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--split", help="pp=2's layers per stage, e.g. 8,4 or 7.5,4.5 (default: "
                    "the balanced split)")
    args = ap.parse_args()
    path = Path(args.out) / "pipeline-llama-110m"
    if not (path / "config.json").is_file():
        test_models.write(path, "llama", "llama-110m", seed=0, tokenizer=False)
    rows = []
    for batch in args.batches:
        one, two = (throughput(path, pp, batch, args.tokens, args.split) for pp in (1, 2))
        rows.append({"batch": batch, "pp2_stages": two["stages"],
                     "pp1_decode_tok_s": round(one["decode_tok_s"], 1),
                     "pp2_decode_tok_s": round(two["decode_tok_s"], 1),
                     "pp2_over_pp1_decode": round(two["decode_tok_s"] / one["decode_tok_s"], 3),
                     "pp1_tok_s": round(one["tok_s"], 1), "pp2_tok_s": round(two["tok_s"], 1),
                     "pp2_over_pp1": round(two["tok_s"] / one["tok_s"], 3),
                     "pp2_bubble_per_stage": two["bubble_per_stage"]})
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_ray:
        from shardserve.runtime.ray_executor import connect

        connect(None)  # a local Ray instance: loopback only, token auth on
        for batch in (1, 16):
            local, ray = step_ms(path, "local", batch, 64), step_ms(path, "ray", batch, 64)
            print(json.dumps({"tp": 2, "batch": batch, "local_ms_per_step": round(local, 2),
                              "ray_ms_per_step": round(ray, 2),
                              "ray_over_local": round(ray / local, 3)}), flush=True)


if __name__ == "__main__":
    main()
