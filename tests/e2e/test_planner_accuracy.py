"""The cost model against the engine on this machine, a subset of
``benchmarks/planner_accuracy.py``: calibrate ``cpu:1`` for float32, then a llama-110m-shaped
model's prefill and decode steps predicted within 20% of measured. The calibration probes
decode batches up to 16, the largest predicted here (the benchmark probes 64 too).

The machines CI runs on drift 20-50% in speed within minutes (measured: the same engine's
step moved 11.9 -> 14.7 ms seconds apart), so a calibration taken in a slow minute predicts a
fast one 30% off (here prefill came out -40% in 3 of 7 attempts, decode 1 +33% in one, the
others within 15%). Up to three attempts, each a fresh calibration and measurement; every
attempt's errors are printed."""

import pytest

from shardserve import test_models
from shardserve.bench.calibrate import calibrate
from shardserve.bench.steps import measure
from shardserve.config import ModelConfig
from shardserve.planner import cost
from shardserve.planner.hardware import read_profiles

pytestmark = pytest.mark.slow


def _errors(tmp_path, path) -> dict[str, float]:
    """Predicted / measured - 1 of each step, from a calibration taken now."""
    calibrate(tmp_path / "local.yaml", splits=[1], formats=["float32"], max_batch=16)
    hw = read_profiles(tmp_path / "local.yaml")["local"]
    spec = ModelConfig(str(path)).spec
    got = measure(path, tp=1, prefills=(128,), batches=(1, 16), context=128)
    rates, whole = hw.rates(1), [cost.Stage.whole(spec.num_layers)]
    errors = {}
    for kind, size, ms in [("prefill", 128, got["prefill_ms"][128]),
                           ("decode", 1, got["decode_ms"][1]),
                           ("decode", 16, got["decode_ms"][16])]:
        shape = cost.StepShape(kind, 1, size) if kind == "prefill" else \
            cost.StepShape(kind, size, round(got["decode_context"][size]))
        predicted = 1e3 * cost.step_s(spec, 1, whole, "float32", "float32", shape, rates)
        errors[f"{kind} {size}"] = predicted / ms - 1
    return errors


@pytest.mark.timeout(600)
def test_predicted_steps_within_20_percent_of_measured(tmp_path):
    path = test_models.write(tmp_path / "m", "llama", "llama-110m", tokenizer=False)
    for attempt in (1, 2, 3):
        errors = _errors(tmp_path, path)
        print(f"attempt {attempt}:", {k: f"{e:+.1%}" for k, e in errors.items()})
        if all(abs(e) <= 0.2 for e in errors.values()):
            return
    pytest.fail(f"predicted / measured - 1 outside 20% in three attempts: {errors}")
