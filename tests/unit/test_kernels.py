"""The native linear kernels (small-batch and packed) against ``F.linear``, and where they
decline."""

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
    packed = ops.pack_weight(w, force=True)
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
    assert ops.pack_weight(torch.randn(nr + 1, 8), force=True) is None  # not whole panels
    assert ops.pack_weight(torch.randn(nr, 8, dtype=torch.bfloat16), force=True) is None
    # AVX-512 builds pack layers' weights; the AVX2 build leaves them to PyTorch's GEMM
    assert (ops.pack_weight(torch.randn(nr, 8)) is not None) == (nr >= 64)
    packed = ops.pack_weight(torch.randn(nr, 8), force=True)
    assert ops.packed_linear(torch.randn(2, 9), packed) is None  # wrong input width
    assert ops.packed_linear(torch.randn(2, 8).double(), packed) is None
