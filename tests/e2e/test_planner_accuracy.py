"""The cost model against the engine on this machine, a subset of
``benchmarks/planner_accuracy.py``: calibrate ``cpu:1`` for float32, then a llama-110m-shaped
model's prefill and decode steps predicted within 20% of measured. The calibration probes
decode batches up to 16, the largest predicted here (the benchmark probes 64 too).

The machines CI runs on drift 20-50% in speed within minutes (the same engine's batch-1 step
measured 10.0 and 14.1 ms two minutes apart), and a calibration taken in a slow minute
predicts a fast one 30% off: with the model measured only after calibrating, prefill came out
-47% and decode 1 +37% in attempts whose other figures were within 7%. So the model is
measured before and after its calibration, and a prediction counts as off by its distance
to the nearer end of that range (inside it: 0). Up to two attempts, each fresh; every
attempt's figures are printed."""

import pytest

from shardserve import test_models
from shardserve.bench.calibrate import calibrate
from shardserve.bench.steps import measure
from shardserve.config import ModelConfig
from shardserve.planner import cost
from shardserve.planner.hardware import read_profiles

pytestmark = pytest.mark.slow


def _steps(path) -> dict[tuple[str, int], tuple[float, int]]:
    """(kind, size) -> (ms, context) of each step the test predicts, measured now."""
    got = measure(path, tp=1, prefills=(128,), batches=(1, 16), context=128)
    return {("prefill", 128): (got["prefill_ms"][128], 128),
            **{("decode", b): (got["decode_ms"][b], round(got["decode_context"][b]))
               for b in (1, 16)}}


def _off(predicted: float, lo: float, hi: float) -> float:
    """Relative distance of ``predicted`` from the measured range [lo, hi]."""
    return predicted / lo - 1 if predicted < lo else max(0.0, predicted / hi - 1)


def _attempt(tmp_path, path) -> dict[str, str]:
    before = _steps(path)
    calibrate(tmp_path / "local.yaml", splits=[1], formats=["float32"], max_batch=16)
    after = _steps(path)
    rates = read_profiles(tmp_path / "local.yaml")["local"].rates(1)
    spec = ModelConfig(str(path)).spec
    whole = [cost.Stage.whole(spec.num_layers)]
    report = {}
    for (kind, size), (ms0, ctx) in before.items():
        ms1 = after[kind, size][0]
        shape = cost.StepShape(kind, 1, size) if kind == "prefill" else \
            cost.StepShape(kind, size, ctx)
        predicted = 1e3 * cost.step_s(spec, 1, whole, "float32", "float32", shape, rates)
        report[f"{kind} {size}"] = (_off(predicted, min(ms0, ms1), max(ms0, ms1)),
                                    f"{predicted:.1f} ms vs {ms0:.1f} / {ms1:.1f}")
    return report


@pytest.mark.timeout(600)
def test_predicted_steps_within_20_percent_of_measured(tmp_path):
    path = test_models.write(tmp_path / "m", "llama", "llama-110m", tokenizer=False)
    for attempt in (1, 2):
        report = _attempt(tmp_path, path)
        print(f"attempt {attempt}:", {k: f"{e:+.1%} ({why})" for k, (e, why) in report.items()})
        if all(abs(e) <= 0.2 for e, _ in report.values()):
            return
    pytest.fail(f"predicted outside 20% of the measured range in two attempts: {report}")


def test_off_is_the_distance_to_the_nearer_end_of_the_range():
    assert _off(10, 8, 12) == 0 and _off(6, 8, 12) == -0.25 and _off(15, 8, 12) == 0.25
