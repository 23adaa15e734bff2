"""DLRM with sharded tables against a single-process PyTorch reference (``nn.EmbeddingBag`` and
the same MLPs, read from the same checkpoint): scores within 1e-5 with the tables over 1, 2
and 4 devices, a row-wise table among them and one table larger than a device's budget; each
device holding only its shards; bad inputs refused naming the feature."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from shardserve import test_models
from shardserve.config import ModelConfig
from shardserve.engine.errors import InvalidRequest
from shardserve.engine.recommender import RecommenderEngine
from shardserve.planner.recsys import plan_tables
from shardserve.runtime.devices import Device, split_cores

pytestmark = pytest.mark.slow


class Reference(nn.Module):
    """DLRM as TorchRec computes it, in one process, from the checkpoint's tensors (also the
    unsharded baseline of benchmarks/recsys.py, so written for speed as well)."""

    def __init__(self, path):
        super().__init__()
        cfg = ModelConfig(str(path))
        self.spec = spec = cfg.spec
        w = load_file(str(path / "model.safetensors"))
        self.bags = nn.ModuleList()
        for f, n in enumerate(spec.num_embeddings):
            bag = nn.EmbeddingBag(n, spec.embedding_dim, mode=spec.pooling)
            bag.weight.data.copy_(w[spec.table_name(f)])
            self.bags.append(bag)
        self.layers = []
        for prefix, i, o in spec.mlp_shapes():
            lin = nn.Linear(i, o)
            lin.weight.data.copy_(w[f"{prefix}.weight"])
            lin.bias.data.copy_(w[f"{prefix}.bias"])
            self.layers.append(lin)
        self.triu = torch.triu_indices(spec.num_tables + 1, spec.num_tables + 1, offset=1)

    @torch.inference_mode()
    def forward(self, dense, values, lengths):
        nd = len(self.spec.dense_layers)
        x = torch.from_numpy(np.asarray(dense, np.float32))
        values = torch.from_numpy(np.asarray(values, np.int64))
        lengths = torch.from_numpy(np.asarray(lengths, np.int64))
        for lin in self.layers[:nd]:
            x = torch.relu(lin(x))
        pooled, start = [], 0
        for f, bag in enumerate(self.bags):
            count = int(lengths[f].sum())
            offsets = torch.zeros(len(x), dtype=torch.long)
            offsets[1:] = torch.cumsum(lengths[f], 0)[:-1]
            pooled.append(bag(values[start:start + count], offsets))
            start += count
        combined = torch.cat([x.unsqueeze(1), torch.stack(pooled, 1)], 1)
        dots = torch.bmm(combined, combined.transpose(1, 2))
        x = torch.cat([x, dots[:, self.triu[0], self.triu[1]]], 1)
        for lin in self.layers[nd:-1]:
            x = torch.relu(lin(x))
        return torch.sigmoid(self.layers[-1](x)).squeeze(1).numpy()


def batch(spec, n, seed, max_ids=4):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, spec.dense_in_features)).astype(np.float32)
    lengths = rng.integers(0, max_ids + 1, (spec.num_tables, n)).astype(np.int32)
    values = np.concatenate([rng.integers(0, spec.num_embeddings[f], int(lengths[f].sum()))
                             for f in range(spec.num_tables)]).astype(np.int64)
    return dense, values, lengths


@pytest.fixture(scope="module", params=["sum", "mean"])
def model(request, tmp_path_factory):
    path = test_models.write(tmp_path_factory.mktemp("dlrm"), "dlrm", "small",
                             overrides={"pooling": request.param})
    return path


def _devices(n, budget):
    return [Device("cpu", i, cores, budget) for i, cores in enumerate(split_cores(n))]


def test_sharded_scores_equal_the_reference(model):
    spec = ModelConfig(str(model)).spec
    ref = Reference(model)
    # a budget that holds a quarter of the tables but not the largest one whole
    tight = max(plan_tables(spec, 4, "float32").bytes_per_device()) + (64 << 10)
    assert max(spec.num_embeddings) * spec.embedding_dim * 4 > tight
    with pytest.raises(ValueError, match="shard the tables over tp>=4"):
        RecommenderEngine(ModelConfig(str(model)), 1, _devices(1, tight))
    inputs = [batch(spec, n, seed) for n, seed in ((1, 0), (7, 1), (64, 2))]
    expected = [ref(*x) for x in inputs]
    assert np.std(expected[2]) > 0.01  # scores that tell samples apart
    for tp in (1, 2, 4):
        plan = plan_tables(spec, tp, "float32")
        largest = spec.num_embeddings.index(max(spec.num_embeddings))
        # a third of all rows: whole on one of two devices, split over four
        assert plan.kind(largest) == ("row_wise" if tp == 4 else "table_wise")
        devices = _devices(tp, tight if tp == 4 else 1 << 30)
        with RecommenderEngine(ModelConfig(str(model)), tp, devices) as engine:
            for x, want in zip(inputs, expected, strict=True):
                np.testing.assert_allclose(engine.score(*x), want, atol=1e-5, rtol=0)
            # several requests in one call: each gets its own scores back
            merged = engine.score_many(inputs)
            for got, want in zip(merged, expected, strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            stats = engine.executor.collective_rpc("stats")
        held = {}
        for s in stats:  # a device holds its shards and nothing else
            mine = {int(t): tuple(r) for t, r in s["tables"].items()}
            assert mine == {sh.table: (sh.start, sh.stop) for sh in plan.on(s["rank"])}
            for t, r in mine.items():
                held.setdefault(t, []).append(r)
            assert s["weight_bytes"] == plan.bytes_per_device()[s["rank"]]
            assert s["bytes_read"] <= s["weight_bytes"]
            assert s["weight_bytes"] <= devices[0].memory_budget
        assert sorted(held) == list(range(spec.num_tables))


def test_bad_inputs_name_what_is_wrong(model):
    spec = ModelConfig(str(model)).spec
    with RecommenderEngine(ModelConfig(str(model)), 2, _devices(2, 1 << 30)) as engine:
        dense, values, lengths = batch(spec, 3, 5)
        cases = [
            ((dense[:, :5], values, lengths), "dense: expected FP32 \\[N, 13\\]"),
            ((dense, values, lengths[:20]), "sparse_lengths: expected INT32 \\[26, 3\\]"),
            ((dense, values[:-1], lengths), "sparse_values: .* ids, but sparse_lengths sum"),
        ]
        big = values.copy()
        first = int(lengths[0].sum())
        big[first] = spec.num_embeddings[1]  # feature 1's first id, one past its table
        neg = lengths.copy()
        neg[3, 1] = -1
        cases += [((dense, big, lengths), "feature cat_1 has id"),
                  ((dense, values, neg), "feature cat_3 has a negative length")]
        for args, message in cases:
            with pytest.raises(InvalidRequest, match=message):
                engine.score(*args)
        # and the model keeps scoring
        assert engine.score(dense, values, lengths).shape == (3,)


def test_bfloat16_tables_score_close_to_float32(tmp_path):
    """A checkpoint stored in bfloat16 runs in bfloat16 (tables and MLPs, sums of pooled rows
    in float32): its scores stay near the float32 reference of the same (rounded) weights."""
    path = test_models.write(tmp_path / "bf16", "dlrm", "small", dtype="bfloat16")
    spec = ModelConfig(str(path)).spec
    assert spec.dtype == "bfloat16"
    ref = Reference(path)  # the bfloat16 weights, widened to float32
    x = batch(spec, 16, seed=9)
    with RecommenderEngine(ModelConfig(str(path)), 2, _devices(2, 1 << 30)) as engine:
        got = engine.score(*x)
        stats = engine.executor.collective_rpc("stats")
    np.testing.assert_allclose(got, ref(*x), atol=0.03)
    plan = plan_tables(spec, 2, "bfloat16")
    assert [s["weight_bytes"] for s in stats] == plan.bytes_per_device()
