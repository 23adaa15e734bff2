"""A checkpoint split over several files with an index loads the same as one file, and a
bfloat16 checkpoint serves too."""

import numpy as np
import pytest

from shardserve import LLM, SamplingParams, test_models
from shardserve.planner.memory import shard, weight_bytes_per_device

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _run(path, tp):
    with LLM(str(path), tensor_parallel_size=tp) as llm:
        out = llm.generate(prompt_token_ids=[[1, 9, 40, 7]], sampling_params=GREEDY)
        logits = llm.engine.executor.collective_rpc("prompt_logits", token_ids=[1, 9, 40, 7])[0]
    return out[0].outputs[0].token_ids, logits


def test_sharded_index_equals_single_file(tmp_path):
    one = test_models.write(tmp_path / "one", "qwen2", "tiny", seed=3)
    many = test_models.write(tmp_path / "many", "qwen2", "tiny", seed=3,
                             max_shard_bytes=64 * 1024)
    assert (many / "model.safetensors.index.json").is_file()
    assert len(list(many.glob("*.safetensors"))) > 2
    tokens_one, logits_one = _run(one, 2)
    tokens_many, logits_many = _run(many, 2)
    assert tokens_one == tokens_many
    np.testing.assert_array_equal(logits_one, logits_many)


def test_bfloat16_checkpoint_serves(tmp_path):
    path = test_models.write(tmp_path / "bf16", "llama", "tiny", dtype="bfloat16")
    with LLM(str(path), tensor_parallel_size=2) as llm:
        assert llm.model_config.torch_dtype_name == "bfloat16"
        out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY)
        stats = llm.engine.executor.collective_rpc("stats")
    assert len(out[0].outputs[0].token_ids) == 12
    spec, precision = llm.model_config.spec, llm.engine.precision
    assert precision.weights == "bfloat16"  # kept in 16 bits (no float32 copy)
    # norms (and biases) are held in the compute dtype: float32 on the native CPU path; the
    # LM head's vocabulary slice (451 rows) is padded to whole panels of the packed kernel
    from shardserve.kernels import ops

    pad = -shard(spec.vocab_size, 2) % (ops.packed_width() or 1) * spec.hidden_size * 2
    assert stats[0]["weight_bytes"] == weight_bytes_per_device(spec, 2, "bfloat16",
                                                               precision.compute) + pad
    assert stats[0]["bytes_read"] == weight_bytes_per_device(spec, 2, "bfloat16")  # as stored


@pytest.mark.parametrize("part", ["k_proj", "up_proj"])
def test_a_missing_part_of_a_merged_parameter_is_refused_by_name(tmp_path, part):
    from safetensors.torch import load_file, save_file

    path = test_models.write(tmp_path / "m", "llama", "tiny")
    weights = load_file(str(path / "model.safetensors"))
    name = next(n for n in weights if f".1.{'self_attn' if part == 'k_proj' else 'mlp'}."
                f"{part}." in n)
    del weights[name]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(RuntimeError, match=f"lacks tensors for: {name}"):
        LLM(str(path), tensor_parallel_size=2)


def test_generation_stops_on_every_eos_id_of_generation_config(tmp_path):
    import json

    path = test_models.write(tmp_path / "m", "llama", "tiny")
    with LLM(str(path)) as llm:
        free = llm.generate(prompt_token_ids=[[1, 9, 40, 7]], sampling_params=GREEDY)
    tokens = free[0].outputs[0].token_ids
    for stop_at in (3, 7):
        (path / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [2, tokens[stop_at]]}))
        with LLM(str(path)) as llm:
            out = llm.generate(prompt_token_ids=[[1, 9, 40, 7]],
                               sampling_params=SamplingParams(max_tokens=12, temperature=0))
        first = tokens.index(tokens[stop_at])
        assert out[0].outputs[0].token_ids == tokens[:first + 1]
        assert out[0].outputs[0].finish_reason == "stop"
