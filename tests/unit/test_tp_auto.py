"""``tp: auto`` in model.yaml: the smallest tensor-parallel size that fits the free devices,
sized by the planner as every other deployment."""

import dataclasses

import pytest

from shardserve import test_models
from shardserve.config import DeploymentConfig
from shardserve.engine.host import deployment_need, resolve_tp
from shardserve.planner.placement import Plan, place
from shardserve.runtime.precision import choose


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return test_models.write(tmp_path_factory.mktemp("m"), "llama", "small")


def _cfg(path, **kw):
    return DeploymentConfig(name="m", path=str(path), max_num_seqs=2, max_model_len=256, **kw)


def _need(path, tp):
    cfg = _cfg(path, tp=tp)
    model = cfg.model_config()
    return deployment_need(cfg, model, choose(model, "cpu")).bytes_per_device


def test_auto_takes_the_smallest_tp_that_fits(small):
    one, two = _need(small, 1), _need(small, 2)
    assert two < one
    cfg = _cfg(small, tp="auto")
    model = cfg.model_config()
    precision = choose(model, "cpu")
    roomy = Plan(dict.fromkeys(["cpu:0", "cpu:1", "cpu:2", "cpu:3"], one * 2))
    resolved, need = resolve_tp(cfg, model, precision, roomy)
    assert resolved.tp == 1 and need.bytes_per_device == one
    tight = Plan(dict.fromkeys(["cpu:0", "cpu:1", "cpu:2", "cpu:3"], (one + two) // 2))
    resolved, need = resolve_tp(cfg, model, precision, tight)
    assert resolved.tp == 2 and need.tp == 2 and need.bytes_per_device == two
    # what is already placed counts: two devices taken leave room for tp=2 only
    place(tight.budgets, [dataclasses.replace(need, name="other/0")], tight)
    resolved, _ = resolve_tp(dataclasses.replace(cfg, replicas=1), model, precision, tight)
    assert resolved.tp == 2
    full = Plan(dict.fromkeys(["cpu:0", "cpu:1"], two // 4))
    with pytest.raises(ValueError, match="tp: auto: no tensor-parallel size of"):
        resolve_tp(cfg, model, precision, full)


def test_model_yaml_takes_auto_and_refuses_other_words(small, tmp_path):
    (tmp_path / "model.yaml").write_text(f"weights: {small}\ntp: auto\n")
    assert DeploymentConfig.from_folder(str(tmp_path)).tp == "auto"
    (tmp_path / "model.yaml").write_text(f"weights: {small}\ntp: many\n")
    with pytest.raises(ValueError, match="tp must be an integer >= 1 or auto"):
        DeploymentConfig.from_folder(str(tmp_path))
