import pytest

from shardserve.config import DeploymentConfig
from shardserve.planner.placement import Need, place, release

GiB = 2**30


def test_spreads_then_shares_devices_within_budgets():
    budgets = {f"cpu:{i}": 4 * GiB for i in range(4)}
    plan = place(budgets, [Need("big", 2, 3 * GiB), Need("small", 1, 1 * GiB)])
    assert plan.assigned["big"] == ["cpu:0", "cpu:1"]
    assert plan.assigned["small"] == ["cpu:2"]  # the freest device
    place(budgets, [Need("third", 4, 1 * GiB)], plan)  # shares all four
    assert {d: plan.free(d) for d in budgets} == {"cpu:0": 0, "cpu:1": 0, "cpu:2": 2 * GiB,
                                                  "cpu:3": 3 * GiB}
    release(plan, "big")
    assert plan.free("cpu:0") == 3 * GiB


def test_a_refusal_names_the_need_and_changes_nothing():
    budgets = {"cpu:0": 2 * GiB, "cpu:1": 2 * GiB}
    plan = place(budgets, [Need("a", 1, GiB)])
    before = dict(plan.assigned)
    with pytest.raises(ValueError, match=r"'b' needs 1.5 GiB on each of 2 devices"):
        place(budgets, [Need("c", 1, GiB // 2), Need("b", 2, 3 * GiB // 2)], plan)
    assert plan.assigned == before
    with pytest.raises(ValueError, match="needs 3 devices; there are 2"):
        place(budgets, [Need("wide", 3, 1)], plan)
    with pytest.raises(ValueError, match="already placed"):
        place(budgets, [Need("a", 1, 1)], plan)


@pytest.mark.parametrize("text,error", [
    ("name: x\ntp: 0\n", "tp must be an integer >= 1"),
    ("name: x\ncolour: blue\n", "unknown field 'colour'"),
    ("name: x\nkind: vision\n", "kind 'vision' is not served; use llm, speech, encoder or"),
    ("- a list\n", "expected a mapping"),
    ("name: [unclosed\n", "cannot read"),
])
def test_model_yaml_errors_name_the_file_and_field(tmp_path, text, error):
    (tmp_path / "model.yaml").write_text(text)
    with pytest.raises(ValueError, match=error) as e:
        DeploymentConfig.from_folder(str(tmp_path))
    assert "model.yaml" in str(e.value)


def test_model_yaml_defaults(tmp_path):
    (tmp_path / "model.yaml").write_text("tp: 2\nweights: ../w\n")
    cfg = DeploymentConfig.from_folder(str(tmp_path))
    assert cfg.name == tmp_path.name and cfg.tp == 2 and cfg.path.endswith("/w")
