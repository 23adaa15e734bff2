"""The native linear kernels (small-batch and packed) against ``F.linear``, and where they
decline."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from shardserve.kernels import ops
from shardserve.layers.linear import linear

pytestmark = pytest.mark.skipif(not ops.available(), reason="native kernels do not build here")


@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("shape", [(300, 768), (1000, 37), (5, 8)], ids=str)  # (out, in)
def test_small_linear_matches_f_linear(rows, shape):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g)
    b = torch.randn(shape[0], generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    with torch.inference_mode():
        for bias in (None, b):
            got = ops.small_linear(x, w, bias)
            assert got is not None
            torch.testing.assert_close(got, F.linear(x, w, bias), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(linear(x, w, bias), got)


def test_small_linear_declines_what_it_does_not_take():
    w = torch.randn(16, 32)
    with torch.inference_mode():
        assert ops.small_linear(torch.randn(9, 32), w) is None  # more rows: PyTorch's GEMM
        assert ops.small_linear(torch.randn(2, 32, dtype=torch.bfloat16),
                                w.bfloat16()) is None
        assert ops.small_linear(torch.randn(2, 2, 32), w) is None
        x = torch.randn(9, 32)
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
    assert ops.small_linear(torch.randn(2, 32), w) is None  # autograd on: PyTorch


# Row counts around the micro-kernel's 6-row tile and the row split across threads; inputs
# shorter and longer than one K block (512), odd ones included.
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 64, 97, 300])
@pytest.mark.parametrize("in_features", [37, 768, 1100])
def test_packed_linear_matches_f_linear(rows, in_features):
    nr = ops.packed_width()
    g = torch.Generator().manual_seed(rows * in_features)
    w = torch.randn(3 * nr, in_features, generator=g)
    b = torch.randn(3 * nr, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    packed = ops.pack_weight(w)
    assert packed.shape == (3, in_features, nr)
    assert torch.equal(ops.unpack_weight(packed), w)
    for bias in (None, b):
        got = ops.packed_linear(x, packed, bias)
        torch.testing.assert_close(got, F.linear(x, w, bias), atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(linear(x, packed, bias), got)
    # leading dimensions and a non-contiguous input are flattened, as F.linear takes them
    x3 = torch.randn(in_features, 2, rows, generator=g).permute(1, 2, 0)
    torch.testing.assert_close(ops.packed_linear(x3, packed, b), F.linear(x3, w, b),
                               atol=1e-3, rtol=1e-5)


def test_packed_weight_only_where_the_kernel_takes_it():
    nr = ops.packed_width()
    assert ops.pack_weight(torch.randn(nr + 1, 8)) is None  # not whole panels
    assert ops.pack_weight(torch.randint(0, 9, (nr, 8))) is None  # int64
    padded = ops.pack_weight(torch.randn(nr + 1, 8).bfloat16(), pad=True)  # zero rows added
    assert padded.shape == (2, 8, nr) and not padded[1, :, 1:].any()
    packed = ops.pack_weight(torch.randn(nr, 8))
    assert ops.packed_linear(torch.randn(2, 9), packed) is None  # wrong input width
    assert ops.packed_linear(torch.randn(2, 8).double(), packed) is None


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_fused_elementwise_match_pytorch(rows):
    from shardserve.layers.rotary import _rotate

    g = torch.Generator().manual_seed(rows)
    x, r, w = (torch.randn(rows, 200, generator=g), torch.randn(rows, 200, generator=g),
               torch.randn(200, generator=g))
    for residual in (None, r):
        total = x if residual is None else x + residual
        ref = w * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5))
        out, got_total = ops.add_rms_norm(x, residual, w, 1e-5)
        torch.testing.assert_close(got_total, total)
        torch.testing.assert_close(out, ref)

    gate_up = torch.randn(rows, 2 * 96, generator=g) * 8  # both signs, large magnitudes
    torch.testing.assert_close(ops.silu_mul(gate_up),
                               F.silu(gate_up[:, :96]) * gate_up[:, 96:])

    # q and k as the QKV projection leaves them: strided views of one (N, q + k + v) tensor
    nh, nkv, hd = 6, 2, 16
    qkv = torch.randn(rows, (nh + 2 * nkv) * hd, generator=g)
    cos, sin = torch.randn(50, hd, generator=g), torch.randn(50, hd, generator=g)
    pos = torch.randint(0, 50, (rows,), generator=g)
    q, k = qkv[:, :nh * hd].view(rows, nh, hd), qkv[:, nh * hd:(nh + nkv) * hd].view(rows, nkv, hd)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    want_q, want_k, v = _rotate(q, c, s), _rotate(k, c, s), qkv[:, (nh + nkv) * hd:].clone()
    assert ops.rotary_(q, k, cos, sin, pos)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert torch.equal(qkv[:, (nh + nkv) * hd:], v)  # v untouched
    # what the kernels do not take goes back to PyTorch
    assert ops.silu_mul(gate_up.double()) is None
    assert not ops.rotary_(q.double(), k.double(), cos, sin, pos)
    assert ops.add_rms_norm(x, r[:, :100], w, 1e-5) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 97])
def test_16_bit_weights_run_in_float32_registers(dtype, rows):
    """A 16-bit weight is exactly its float32 value: the kernels must equal F.linear on the
    weight converted to float32, at every row count, packed or not."""
    nr = ops.packed_width()
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(2 * nr, 300, generator=g).to(dtype)
    b = torch.randn(2 * nr, generator=g)
    x = torch.randn(rows, 300, generator=g)
    want = F.linear(x, w.float(), b)
    with torch.inference_mode():
        packed = ops.pack_weight(w)
        assert packed is not None and packed.dtype == dtype  # 16-bit: packed on every build
        torch.testing.assert_close(linear(x, packed, b), want, atol=1e-4, rtol=1e-5)
        if rows <= ops.SMALL_GEMM_MAX_ROWS:
            torch.testing.assert_close(ops.small_linear(x, w, b), want, atol=1e-4, rtol=1e-5)
        assert ops.small_linear(x.to(dtype), w) is None  # activations stay float32


def _rounded_as_the_kernel_reads(x: torch.Tensor, packed: torch.Tensor,
                                 mode: int) -> torch.Tensor:
    """K-pair panels (bfloat16 dot products) take the activations rounded to bfloat16, but
    int8 ones at a few rows on AMX (float32 registers there)."""
    few_i8 = packed.dtype == torch.int8 and x.shape[0] <= ops.FEW_I8_ROWS and mode == 2
    return x.bfloat16().float() if packed.dim() == 4 and not few_i8 else x


def _skip_without_pairs(mode: int) -> None:
    if ops.pair_mode() == 0:
        pytest.skip("bfloat16 weights are not packed in K pairs here (no AMX, and vdpbf16ps "
                    "no faster than float32 FMAs or absent)")
    if ops.cpu_pair_mode() < mode:
        pytest.skip(f"no {ops.PAIR_MODES[mode]} on this CPU")


@pytest.mark.parametrize("mode", [1, 2], ids=lambda m: ops.PAIR_MODES[m])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 17, 31, 33, 64, 80, 130, 200, 300])
@pytest.mark.parametrize("in_features", [32, 768, 1056])
def test_bfloat16_dot_products(mode, rows, in_features):
    """bfloat16 (and int8) weights on the CPU's bfloat16 dot products (``bf16_gemm.c``):
    activations rounded to bfloat16 once (round to nearest even, as ``Tensor.bfloat16``),
    products and sums float32, so the result is F.linear on those rounded activations up to
    the order of the float32 sums; at every AMX tile shape (16 / 32 rows, partial tiles) and
    vdpbf16ps row count, with the bias and the int8 scales (int8 at 16 rows or fewer on AMX:
    float32 activations on float32 registers, at each of its 1-3 row tiles)."""
    _skip_without_pairs(mode)
    g = torch.Generator().manual_seed(rows * in_features + mode)
    w = torch.randn(3 * ops.PAIR_WIDTH - 5, in_features, generator=g)  # padded to panels
    b = torch.randn(w.shape[0], generator=g)
    x = torch.randn(rows, in_features, generator=g)
    xr = x.bfloat16().float()
    with torch.inference_mode():
        packed = ops.pack_weight(w.bfloat16(), pad=True)
        assert packed.shape == (3, in_features // 2, ops.PAIR_WIDTH, 2)
        assert torch.equal(ops.unpack_weight(packed)[:w.shape[0]], w.bfloat16())
        assert torch.equal(ops.packed_rows(packed, torch.tensor([0, 70, 130])),
                           w.bfloat16()[[0, 70, 130]])
        for bias in (None, b):
            got = ops.packed_linear(x, packed, None if bias is None else
                                    torch.cat([bias, bias.new_zeros(5)]), mode=mode)
            want = F.linear(xr, w.bfloat16().float(), bias)
            torch.testing.assert_close(got[:, :w.shape[0]], want, atol=1e-4, rtol=1e-5)
        q, scale = ops.quantize_int8(w)
        packed = ops.pack_weight(q, pad=True)
        scale = torch.cat([scale, scale.new_ones(5)])
        assert packed.dim() == 4 and packed.dtype == torch.int8
        got = ops.packed_linear(x, packed, None, scale, mode=mode)[:, :w.shape[0]]
        want = F.linear(_rounded_as_the_kernel_reads(x, packed, mode),
                        ops.dequantize_int8(q, scale[:w.shape[0]]))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", [1, 2], ids=lambda m: ops.PAIR_MODES[m])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 128, 200])
def test_gate_up_with_its_activation_fused(mode, rows):
    """``packed_linear(silu_mul=True)`` over gate and up rows interleaved every 32 features:
    exactly the plain GEMM's sums (put back in order) through the elementwise silu_mul, for
    bfloat16 and int8 panels (with a bias), at AMX, vdpbf16ps and few-row int8 row counts."""
    _skip_without_pairs(mode)
    g = torch.Generator().manual_seed(rows + 100 * mode)
    inter, k = 96, 256  # 3 blocks of 32: gate and up share panels unevenly with the 64-wide
    w = torch.randn(2 * inter, k, generator=g)
    b = torch.randn(2 * inter, generator=g)
    x = torch.randn(rows, k, generator=g)
    assert torch.equal(ops.deinterleave_gate_up(ops.interleave_gate_up(w), 0), w)
    q, scale = ops.quantize_int8(w)
    for weight, s in ((w.bfloat16(), None), (q, scale)):
        packed = ops.pack_weight(ops.interleave_gate_up(weight))
        s = None if s is None else ops.interleave_gate_up(s)
        bias = ops.interleave_gate_up(b)
        fused = ops.packed_linear(x, packed, bias, s, mode=mode, silu_mul=True)
        plain = ops.packed_linear(x, packed, bias, s, mode=mode)
        assert fused.shape == (rows, inter)
        gate_up = ops.deinterleave_gate_up(plain)
        assert torch.equal(fused, ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(fused, F.silu(gate) * up, atol=1e-5, rtol=1e-5)
    f32 = ops.pack_weight(w)  # float32 panels: no fused form, the caller falls back
    assert f32.dim() == 3 and ops.packed_linear(x, f32, silu_mul=True) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [64, 40])
def test_gate_up_layer_gives_gate_then_up_and_the_activation(dtype, inter):
    """``GateUpParallelLinear``: interleaved only where its weight packs in K pairs and the
    intermediate size is whole blocks of 32; ``forward`` gives gate then up either way and
    ``act`` silu(gate) * up."""
    from shardserve.layers.linear import GateUpParallelLinear
    from shardserve.runtime.group import FakeGroup

    g = torch.Generator().manual_seed(inter)
    layer = GateUpParallelLinear(64, inter, FakeGroup(0, 1))
    w = torch.randn(2 * inter, 64, generator=g).to(dtype)
    layer.weight.data = w.clone()
    layer.process_weights_after_loading()
    fused = dtype == torch.bfloat16 and inter % 32 == 0 and ops.pair_mode() > 0
    assert layer.interleaved == fused
    x = torch.randn(5, 64, generator=g)
    with torch.inference_mode():
        gate_up = layer(x)
        want = F.linear(x.bfloat16().float() if fused else x, w.float())
        torch.testing.assert_close(gate_up, want, atol=1e-3, rtol=1e-3)
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(layer.act(x), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_int8_quantization_is_per_output_channel_and_symmetric():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 300, generator=g) * torch.logspace(-3, 1, 40)[:, None]
    w[7] = 0  # an all-zero row keeps a usable scale
    for dtype in (torch.float32, torch.bfloat16):
        q, scale = ops.quantize_int8(w.to(dtype))
        assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
        assert q.abs().max() <= 127 and (q.abs().amax(1)[scale != 1] == 127).all()
        assert scale[7] == 1 and not q[7].any()
        err = (ops.dequantize_int8(q, scale) - w.to(dtype).float()).abs()
        assert (err <= scale[:, None] * 0.5001).all()  # round to nearest, per row


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 97, 300])
@pytest.mark.parametrize("in_features", [37, 768, 1100])
def test_int8_packed_linear_equals_the_dequantized_weight(rows, in_features):
    """int8 panels times the scales, applied once after the last K block with the bias: the
    same as F.linear on the dequantized float32 weight, at every tile shape and K split."""
    nr = ops.packed_width()
    g = torch.Generator().manual_seed(rows + in_features)
    w = torch.randn(3 * nr, in_features, generator=g)
    b = torch.randn(3 * nr, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    q, scale = ops.quantize_int8(w)
    packed = ops.pack_weight(q)
    assert packed is not None and packed.dtype == torch.int8
    want_w = ops.dequantize_int8(q, scale)
    xr = _rounded_as_the_kernel_reads(x, packed, ops.pair_mode())
    with torch.inference_mode():
        for bias in (None, b):
            got = ops.packed_linear(x, packed, bias, scale)
            torch.testing.assert_close(got, F.linear(xr, want_w, bias), atol=2e-3, rtol=1e-4)
            torch.testing.assert_close(linear(x, packed, bias, scale), got)
        # no kernel for float64 activations: the dequantized PyTorch path, same answer
        x64 = x.double()
        torch.testing.assert_close(linear(x64, packed, b.double(), scale),
                                   F.linear(x64, want_w.double(), b.double()))
        # against the unquantized weight: int8's error, small next to the output
        rel = (ops.packed_linear(x, packed, None, scale) - F.linear(x, w)).norm() / (
            F.linear(x, w).norm())
        assert rel < 0.01


def test_int8_panels_need_their_scales():
    nr = ops.packed_width()
    q, scale = ops.quantize_int8(torch.randn(2 * nr, 64))
    packed = ops.pack_weight(q)
    x = torch.randn(3, 64)
    assert ops.packed_linear(x, packed) is None  # no scales
    assert ops.packed_linear(x, packed, None, scale[:-1]) is None  # wrong length
    assert ops.packed_linear(x, ops.pack_weight(torch.randn(2 * nr, 64)), None,
                             scale) is None  # scales for float weights
    assert ops.small_linear(x, q) is None  # int8 only runs packed


def test_pair_mode_follows_the_measured_rate_and_the_setting(monkeypatch):
    """K-pair panels run on AMX where the CPU has it, on vdpbf16ps only where it measures at
    least DP_RATE_MIN times float32 FMA's products a cycle; SHARDSERVE_BF16_GEMM overrides."""
    cpu, rate = ops.cpu_pair_mode(), ops.dp_rate()
    assert (rate == 0) == (cpu == 0)
    if cpu:
        assert 0.25 < rate < 8  # a ratio of two timings on this core, not a table
    auto = 0 if cpu == 1 and rate < ops.DP_RATE_MIN else cpu
    try:
        for setting, want in (("off", 0), ("0", 0), ("on", cpu), ("", auto)):
            monkeypatch.setenv("SHARDSERVE_BF16_GEMM", setting)
            ops.pair_mode.cache_clear()
            assert ops.pair_mode() == want, setting
            assert ops.packs_in_pairs(torch.bfloat16, 64) == (want > 0)
            assert not ops.packs_in_pairs(torch.float16, 64)
            # what a worker process on this machine is started with, and what it then runs
            env = ops.pair_mode_env()
            assert env == ({} if cpu != 1 else
                           {"SHARDSERVE_BF16_GEMM": "on" if want == 1 else "off"})
            child = subprocess.run(
                [sys.executable, "-c", "from shardserve.kernels import ops; "
                 "print(ops.pair_mode())"], env={**os.environ, **env}, capture_output=True,
                text=True, check=True)
            assert int(child.stdout) == want, setting
    finally:
        monkeypatch.undo()
        ops.pair_mode.cache_clear()
