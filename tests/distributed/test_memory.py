"""A model about 2.5x one device's budget: refused at tp=1 before anything loads, served at
tp=4 with every worker within its budget, each reading only its own slices."""

import pytest

from shardserve import LLM, SamplingParams, test_models
from shardserve.config import ModelConfig
from shardserve.engine import llm_engine
from shardserve.planner.memory import weight_bytes_per_device

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = test_models.write(tmp_path_factory.mktemp("big"), "llama", "small", seed=1)
    full = weight_bytes_per_device(ModelConfig(str(path)).spec, 1, "float32")
    return path, full, int(full / 2.5)


def test_refused_at_tp1_before_any_weight_is_read(big, monkeypatch):
    path, full, budget = big

    def no_spawn(*a, **k):
        raise AssertionError("a worker was started for a model that cannot fit")

    monkeypatch.setattr(llm_engine, "Executor", no_spawn)
    with pytest.raises(ValueError) as e:
        LLM(str(path), tensor_parallel_size=1, devices="cpu:4", device_memory=str(budget))
    msg = str(e.value)
    assert f"{full} bytes" in msg, msg  # what it needs
    assert f"{budget} bytes" in msg  # the budget
    assert "use tp>=4" in msg  # the smallest tp that fits


def test_tp4_loads_and_generates_within_budget(big):
    path, full, budget = big
    with LLM(str(path), tensor_parallel_size=4, devices="cpu:4", device_memory=str(budget),
             max_model_len=512, max_num_batched_tokens=128, max_num_seqs=4) as llm:
        out = llm.generate(prompt_token_ids=[[1, 2, 3, 4]], sampling_params=SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 8
        stats = llm.engine.executor.collective_rpc("stats")
    for s in stats:
        assert s["weight_bytes"] + s["cache_bytes"] <= budget
        # measured (what malloc handed out across the load), not computed: the weights
        # and little more, within the budget
        assert 0.9 * s["weight_bytes"] <= s["loaded_bytes"] <= budget
        assert s["weight_bytes"] < full / 3.5  # a quarter of the weights, plus norms
        # each rank read from disk no more than it holds: no full tensor was materialised
        assert s["bytes_read"] <= s["weight_bytes"]
    spec = ModelConfig(str(path)).spec
    largest_tensor = spec.vocab_size * spec.hidden_size * 4  # the embedding / LM head
    assert max(s["largest_read"] for s in stats) <= largest_tensor // 4 + spec.hidden_size * 4
