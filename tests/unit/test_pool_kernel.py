"""The native pooling kernel (``kernels/embedding.c``) against the PyTorch path it replaces,
rank by rank: whole and row-wise table shards, empty bags, ids in other ranks' rows, 16-bit
tables, a batch large enough for its threads; and the inputs it refuses."""

import numpy as np
import pytest
import torch

from shardserve import test_models
from shardserve.config import ModelConfig
from shardserve.kernels import ops
from shardserve.models.dlrm import DLRM
from shardserve.planner.recsys import plan_tables
from shardserve.runtime.group import FakeGroup

pytestmark = pytest.mark.skipif(ops._fn("embedding", "pool_bags", ()) is None,
                                reason="no C compiler")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return ModelConfig(str(test_models.write(tmp_path_factory.mktemp("dlrm"), "dlrm",
                                             "small"))).spec


def _ids(spec, n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 5, (spec.num_tables, n))
    values = np.concatenate([rng.integers(0, spec.num_embeddings[f], int(lengths[f].sum()))
                             for f in range(spec.num_tables)])
    return torch.from_numpy(values), torch.from_numpy(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world", [1, 4])
def test_the_kernel_pools_as_pytorch_does(spec, dtype, world):
    plan = plan_tables(spec, world, "float32")
    if world == 4:
        assert any(plan.kind(t) == "row_wise" for t in range(spec.num_tables))
    torch.manual_seed(0)
    for group in FakeGroup.make(world):
        model = DLRM(spec, 1, group, plan)
        model.rows = torch.randn(model.rows.shape).to(dtype)
        for n, seed in ((1, 0), (3, 1), (64, 2)):  # 64 x 26 bags: the threaded loop
            values, lengths = _ids(spec, n, seed)
            got = ops.pool_bags(model.rows, values, lengths, model.first, model.start,
                                model.count)
            want = model._pooled_torch(values, lengths)
            assert got.shape == want.shape == (n, spec.num_tables, spec.embedding_dim)
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # PyTorch sums 16-bit rows in 16 bits
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_lengths_that_do_not_match_the_ids_are_refused(spec):
    model = DLRM(spec, 1, FakeGroup.make(1)[0])
    values, lengths = _ids(spec, 2, 3)
    args = (model.first, model.start, model.count)
    assert ops.pool_bags(model.rows, values[:-1], lengths, *args) is None
    neg = lengths.clone()
    neg[0, 0] = -1
    assert ops.pool_bags(model.rows, values, neg, *args) is None
    assert ops.pool_bags(model.rows, values.int(), lengths, *args) is None  # int64 only
