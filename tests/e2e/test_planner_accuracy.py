"""The cost model against the engine on this machine, a subset of
``benchmarks/planner_accuracy.py``: calibrate ``cpu:1`` for float32, then a llama-110m-shaped
model's prefill and decode steps predicted within 20% of measured."""

import pytest

from shardserve import test_models
from shardserve.bench.calibrate import calibrate
from shardserve.bench.steps import measure
from shardserve.config import ModelConfig
from shardserve.planner import cost
from shardserve.planner.hardware import read_profiles

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_predicted_steps_within_20_percent_of_measured(tmp_path):
    calibrate(tmp_path / "local.yaml", splits=[1], formats=["float32"])
    hw = read_profiles(tmp_path / "local.yaml")["local"]
    path = test_models.write(tmp_path / "m", "llama", "llama-110m", tokenizer=False)
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
    assert all(abs(e) <= 0.2 for e in errors.values()), errors
