"""The native small-batch linear kernel against ``F.linear``, and where it declines."""

import pytest
import torch
import torch.nn.functional as F

from shardserve.kernels import ops
from shardserve.layers.linear import linear

pytestmark = pytest.mark.skipif(not ops.available(), reason="native kernels do not build here")


@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("shape", [(300, 768), (1000, 37), (5, 8)], ids=str)  # (out, in)
@pytest.mark.parametrize("transposed", [False, True])
def test_small_linear_matches_f_linear(rows, shape, transposed):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g)
    b = torch.randn(shape[0], generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    stored = w.t().contiguous() if transposed else w
    with torch.inference_mode():
        for bias in (None, b):
            got = ops.small_linear(x, stored, bias, transposed)
            assert got is not None
            torch.testing.assert_close(got, F.linear(x, w, bias), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(linear(x, stored, bias, transposed), got)


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
