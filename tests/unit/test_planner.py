import pytest
import torch

from shardserve import test_models
from shardserve.config import ModelConfig
from shardserve.models.registry import model_class
from shardserve.planner.memory import (
    check_fits,
    format_bytes,
    parse_bytes,
    weight_bytes_per_device,
)
from shardserve.planner.specs import TransformerSpec, spec_from_hf
from shardserve.runtime.group import FakeGroup


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("3GB", 3 * 10**9), ("1.5GiB", 3 * 2**29),
    ("1024", 1024), (" 4 kib ", 4096), (77, 77),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["2XB", "GiB", "-1GiB", "", "two gigs", "0"])
def test_parse_bytes_rejects_with_a_hint(text):
    with pytest.raises(ValueError, match="write e.g. '2GiB'|must be positive"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(3 * 2**30 + 2**29) == "3.5 GiB"
    assert format_bytes(512) == "512 B"


@pytest.mark.parametrize("arch", sorted(test_models.ARCHS))
@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_planner_bytes_equal_what_every_rank_allocates(arch, size, tp):
    spec = spec_from_hf(test_models.hf_config(arch, size))
    for group in FakeGroup.make(tp):
        with torch.device("meta"):
            model = model_class(spec.architecture)(spec, 64, group)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        assert held == weight_bytes_per_device(spec, tp, "float32")


def test_tinyllama_shape_is_about_4_4_gb():
    spec = TransformerSpec.from_hf(test_models.hf_config("llama", "tinyllama"))
    assert 4.3e9 < weight_bytes_per_device(spec, 1, "float32") < 4.5e9
    assert weight_bytes_per_device(spec, 1, "bfloat16") * 2 == weight_bytes_per_device(
        spec, 1, "float32")


def test_refusal_names_need_budget_and_smallest_tp():
    spec = TransformerSpec.from_hf(test_models.hf_config("llama", "small"))
    need1 = weight_bytes_per_device(spec, 1, "float32")
    budget = int(need1 / 2.5)
    with pytest.raises(ValueError) as e:
        check_fits(spec, 1, "float32", budget, max_tp=4)
    msg = str(e.value)
    assert f"{need1} bytes" in msg and f"{budget} bytes" in msg and "tp>=4" in msg
    assert check_fits(spec, 4, "float32", budget, max_tp=4) <= budget


def test_model_config_reads_sizes_without_weights(tmp_path):
    test_models.write(tmp_path, "qwen2", "tiny")
    spec = ModelConfig(str(tmp_path)).spec
    assert (spec.architecture, spec.num_kv_heads, spec.qkv_bias, spec.tie_word_embeddings) == (
        "Qwen2ForCausalLM", 2, True, True)


def test_classifier_bytes_include_pooler_and_labels():
    cfg = test_models.hf_config("bert", "tiny") | {
        "architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b",
                                                                         "2": "c"}}
    spec = spec_from_hf(cfg)
    for group in FakeGroup.make(2):
        with torch.device("meta"):
            model = model_class(spec.architecture)(spec, 64, group)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        assert held == weight_bytes_per_device(spec, 2, "float32")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("size", ["tiny", "small", "llama-110m"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_int8_bytes_equal_what_the_runner_plans_for_the_marked_layers(arch, size, tp):
    """The planner's int8 bytes match the runner's count over the layers it marks for
    quantization (every linear layer and the LM head, tied or not): one byte per weight and
    a float32 scale per output feature, the rest in the checkpoint's dtype."""
    from shardserve.runtime.model_runner import _nbytes, _quantize

    spec = spec_from_hf(test_models.hf_config(arch, size))
    for group in FakeGroup.make(tp):
        with torch.device("meta"):
            model = _quantize(model_class(spec.architecture)(spec, 64, group), "int8")
        assert _nbytes(model, torch.float32, "int8") == weight_bytes_per_device(
            spec, tp, "float32", "float32", "int8")


def test_int8_is_about_a_quarter_of_float32():
    spec = TransformerSpec.from_hf(test_models.hf_config("llama", "tinyllama"))
    f32 = weight_bytes_per_device(spec, 1, "float32")
    bf16 = weight_bytes_per_device(spec, 1, "bfloat16", "float32", "int8")
    # the untied embedding (65.5M of 1.1B weights) stays in the checkpoint's dtype
    assert 0.26 < bf16 / f32 < 0.27
    with pytest.raises(ValueError, match="int8 weights per device"):
        check_fits(spec, 1, "bfloat16", bf16 - 1, max_tp=1, vector_dtype="float32",
                   quantization="int8")
