"""Model presets and hardware profiles for planning: parameter counts against hand
calculations from the published shapes, and every profile's numbers carrying a source."""

import pytest

from shardserve.planner.hardware import profile, profiles
from shardserve.planner.memory import weight_bytes_per_device, weight_params_per_device
from shardserve.planner.presets import PRESETS, preset


def _llama(h, layers, heads, kv_heads, inter, vocab):
    hd = h // heads
    attn = h * (heads * hd) * 2 + h * (kv_heads * hd) * 2  # q, o, k, v
    return layers * (attn + 3 * h * inter + 2 * h) + 2 * vocab * h + h


@pytest.mark.parametrize(("name", "params"), [
    ("llama-2-70b", _llama(8192, 80, 64, 8, 28672, 32000)),  # 68,976,648,192
    ("llama-3-8b", _llama(4096, 32, 32, 8, 14336, 128256)),  # 8,030,261,248
    # Mixtral: eight experts' MLPs held (the routers' 32 x 8 x 4096 are not counted)
    ("mixtral-8x7b", _llama(4096, 32, 32, 8, 8 * 14336, 32000)),
    # OPT-175B: 12 h^2 a layer (no gate), tied embedding; biases and positions left out
    ("opt-175b", 96 * (12 * 12288**2 + 2 * 12288) + 50272 * 12288 + 12288),
])
def test_presets_hold_the_published_parameter_counts(name, params):
    assert weight_params_per_device(preset(name), 1) == params


def test_the_published_totals_to_three_figures():
    billions = {n: round(weight_params_per_device(preset(n), 1) / 1e9, 1) for n in PRESETS}
    assert billions == {"opt-175b": 174.6, "llama-2-70b": 69.0, "llama-3-8b": 8.0,
                        "mixtral-8x7b": 46.7}
    # 175B in bfloat16 is about 350 GB
    assert 345e9 < weight_bytes_per_device(preset("opt-175b"), 1, "bfloat16") < 352e9


def test_profiles_carry_their_sources():
    shipped = profiles()
    assert {"inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge", "trn1.32xlarge",
            "h100-8x", "h200-8x"} <= set(shipped)
    for hw in shipped.values():
        assert hw.source.startswith("https://") and hw.memory_per_device > 0
    big = profile("inf2.48xlarge")
    assert (big.devices_per_node, big.memory_per_device, big.tflops["bfloat16"]) == \
        (12, 32 << 30, 190)
    with pytest.raises(ValueError, match="no hardware profile 'inf3'"):
        profile("inf3")


def test_bytes_per_device_at_tp8_by_hand():
    """Llama-2-70B in bfloat16 at tp=8: each rank holds 1/8 of q, o, the MLP and the
    vocabulary, one of the eight KV heads, and whole norms; 2 bytes a parameter."""
    h, layers, inter, vocab, hd = 8192, 80, 28672, 32000, 128
    per_layer = (h * h // 8) * 2 + (h * hd) * 2 + 3 * h * (inter // 8) + 2 * h
    params = layers * per_layer + 2 * (vocab // 8) * h + h
    assert weight_bytes_per_device(preset("llama-2-70b"), 8, "bfloat16") == 2 * params
    assert round(2 * params / 2**30, 2) == 16.06  # GiB: fits an 80 GB H100 with room for KV
