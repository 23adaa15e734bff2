"""How close the planner's cost model comes to the engine: predicted against measured prefill
and decode step times on this machine, in one run.

    python benchmarks/planner_accuracy.py [--models llama-110m tinyllama] [--profile PATH]
        [--out results.json]

It first calibrates this machine (``shardserve calibrate``, written to a scratch profile so
the user's own is untouched; ``--profile`` reuses one written in the same session instead),
then, for each model shape (random weights, stored in float32 and in bfloat16) and tp:

- measured: ``shardserve.bench.steps.measure`` on ``cpu:tp``: the engine step that prefills
  one prompt of 128 / 512 tokens alone (best of 3), and the median decode step of 1 / 16 / 64
  sequences at a context of about 130 tokens;
- predicted: ``planner.cost.step_s`` for the same shapes from the profile's ``cpu:tp`` rates.

It prints a markdown table (the one in benchmarks/RESULTS.md) with each error and the largest.
The goal (issue 14): every error within 20%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from shardserve import test_models
from shardserve.bench.calibrate import calibrate
from shardserve.bench.steps import measure
from shardserve.config import ModelConfig
from shardserve.planner import cost
from shardserve.planner.hardware import read_profiles


def predicted_ms(spec, tp: int, dtype: str, rates: cost.Rates, kind: str, size: int,
                 context: int) -> float:
    shape = cost.StepShape(kind, 1, size) if kind == "prefill" else \
        cost.StepShape(kind, size, round(context))
    stages = [cost.Stage.whole(spec.num_layers)]
    return 1e3 * cost.step_s(spec, tp, stages, dtype, dtype, shape, rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["llama-110m", "tinyllama"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--prefills", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--profile", help="a local profile calibrated in this session "
                                      "(default: calibrate now)")
    ap.add_argument("--out", help="write every row as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="planner-accuracy-") as tmp:
        profile_path = Path(args.profile) if args.profile else Path(tmp) / "local.yaml"
        if not args.profile:
            t0 = time.perf_counter()
            calibrate(profile_path)
            print(f"calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        hw = read_profiles(profile_path)["local"]
        rows = []
        for size in args.models:
            for dtype in args.dtypes:
                path = test_models.write(Path(tmp) / f"{size}-{dtype}", "llama", size,
                                         dtype=dtype, tokenizer=False,
                                         max_shard_bytes=1 << 30)
                spec = ModelConfig(str(path)).spec
                for tp in args.tp:
                    m = measure(path, tp=tp, prefills=tuple(args.prefills),
                                batches=tuple(args.batches), context=128)
                    rates = hw.rates(tp)
                    for kind, got in (("prefill", m["prefill_ms"]), ("decode", m["decode_ms"])):
                        for n, ms in got.items():
                            p = predicted_ms(spec, tp, dtype, rates, kind, n,
                                             m["decode_context"].get(n, 0))
                            what = "prompt" if kind == "prefill" else "batch"
                            rows.append({"model": size, "dtype": dtype, "tp": tp,
                                         "step": f"{kind} {what} {n}",
                                         "measured_ms": round(ms, 2),
                                         "predicted_ms": round(p, 2),
                                         "error": round(p / ms - 1, 4)})
                            print(json.dumps(rows[-1]), flush=True)
                for f in path.iterdir():
                    f.unlink()
    print()
    print(f"Source: {hw.source}")
    print()
    print("| model | dtype | tp | step | measured ms | predicted ms | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['tp']} | {r['step']} | {r['measured_ms']} | "
              f"{r['predicted_ms']} | {r['error']:+.1%} |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\nlargest error: {worst['error']:+.1%} ({worst['model']} {worst['dtype']} "
          f"tp={worst['tp']} {worst['step']}); within 20%: "
          f"{sum(abs(r['error']) <= 0.2 for r in rows)} of {len(rows)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"source": hw.source, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
