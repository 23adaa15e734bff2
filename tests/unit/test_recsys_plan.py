"""Embedding tables over devices (``planner/recsys.py``): every row on exactly one device,
tables bigger than a fair share split row-wise, the rest whole on the least loaded device,
and a plan that does not fit refused naming the device and the fix."""

import pytest

from shardserve import test_models
from shardserve.planner.recsys import check_tables_fit, dense_params, plan_tables
from shardserve.planner.specs import DLRMSpec


@pytest.fixture(scope="module")
def spec():
    return DLRMSpec.from_hf(test_models.dlrm_config("small"))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_every_row_lives_on_exactly_one_device(spec, world):
    plan = plan_tables(spec, world, "float32")
    row = spec.embedding_dim * 4
    fair = sum(spec.num_embeddings) * row / world
    for t, n in enumerate(spec.num_embeddings):
        shards = sorted((s.start, s.stop) for s in plan.shards if s.table == t)
        covered = [r for start, stop in shards for r in range(start, stop)]
        assert covered == list(range(n))  # each row once, in order
        assert plan.kind(t) == ("row_wise" if world > 1 and n * row > fair else "table_wise")
    for r in range(world):  # the bytes per device are its rows and the dense layers
        rows = sum(s.rows for s in plan.on(r))
        assert plan.bytes_per_device()[r] == rows * row + dense_params(spec) * 4
    if world > 1:  # whole tables go where there is least: devices stay within one table
        loads = plan.table_bytes
        assert max(loads) - min(loads) <= max(spec.num_embeddings) * row


def test_a_plan_over_budget_names_the_device_and_the_fix(spec):
    two = max(plan_tables(spec, 2, "float32").bytes_per_device())
    assert check_tables_fit(spec, 2, "float32", two).world == 2
    with pytest.raises(ValueError) as e:
        check_tables_fit(spec, 1, "float32", two, max_world=1)
    msg = str(e.value)
    assert "device 0 would hold" in msg and f"{two} bytes" in msg
    assert "shard the tables over tp>=2" in msg and "you have 1" in msg


def test_config_errors_are_named():
    cfg = test_models.dlrm_config("tiny")
    with pytest.raises(ValueError, match="must equal embedding_dim"):
        DLRMSpec.from_hf({**cfg, "dense_arch_layer_sizes": [32, 7]})
    with pytest.raises(ValueError, match="must end in 1"):
        DLRMSpec.from_hf({**cfg, "over_arch_layer_sizes": [32, 2]})
    with pytest.raises(ValueError, match="pooling 'max'"):
        DLRMSpec.from_hf({**cfg, "pooling": "max"})
    with pytest.raises(ValueError, match="lacks or garbles"):
        DLRMSpec.from_hf({k: v for k, v in cfg.items() if k != "embedding_dim"})
