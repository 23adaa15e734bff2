"""Each parallel layer, sharded over FakeGroup ranks in threads, equals the unsharded op on
the same weights; and each rank reads exactly its own slice of the checkpoint."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from shardserve.models.loader import LazyTensor, LoadStats
from shardserve.runtime.group import FakeGroup


def _on_ranks(tp, build, run):
    """Build a layer per rank and run ``run(layer)`` on all ranks at once (collectives meet)."""
    layers = [build(g) for g in FakeGroup.make(tp)]
    with ThreadPoolExecutor(tp) as pool:
        return list(pool.map(run, layers)), layers


@pytest.fixture
def ckpt(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(24, 16, generator=gen), "b": torch.randn(24, generator=gen),
        "w2": torch.randn(24, 16, generator=gen), "w3": torch.randn(16, 24, generator=gen),
        "q": torch.randn(8 * 4, 16, generator=gen), "k": torch.randn(2 * 4, 16, generator=gen),
        "v": torch.randn(2 * 4, 16, generator=gen), "emb": torch.randn(37, 16, generator=gen),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    f = safe_open(str(path), framework="pt")
    return tensors, f


def _lazy(f, name, stats):
    return LazyTensor(name, f.get_slice(name), torch.float32, stats)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_then_row_parallel_equals_dense(ckpt, tp):
    tensors, f = ckpt
    x = torch.randn(5, 16)
    stats = [LoadStats() for _ in range(tp)]

    def build(g):
        col = ColumnParallelLinear(16, 24, g, bias=True)
        col.weight_loader(col.weight, _lazy(f, "w", stats[g.rank]))
        col.weight_loader(col.bias, _lazy(f, "b", stats[g.rank]))
        row = RowParallelLinear(24, 16, g)
        row.weight_loader(row.weight, _lazy(f, "w3", stats[g.rank]))
        return col, row

    outs, _ = _on_ranks(tp, build, lambda m: m[1](m[0](x)))
    ref = F.linear(F.linear(x, tensors["w"], tensors["b"]), tensors["w3"])
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # rank r read exactly its 1/tp of the column weight and bias, plus its 1/tp of the row one
    for s in stats:
        assert s.bytes_read == (24 * 16 + 24 + 16 * 24) * 4 // tp


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_qkv_with_gqa_replicates_kv_heads_past_their_number(ckpt, tp):
    tensors, f = ckpt
    x = torch.randn(3, 16)
    stats = LoadStats()

    def build(g):
        layer = QKVParallelLinear(16, 4, 8, 2, g)
        for sid in "qkv":
            layer.weight_loader(layer.weight, _lazy(f, sid, stats), sid)
        return layer

    outs, layers = _on_ranks(tp, build, lambda m: m(x))
    q_ref, k_ref, v_ref = (F.linear(x, tensors[n]) for n in "qkv")
    for layer, out in zip(layers, outs, strict=True):
        q, k, v = out.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
        r = layer.group.rank
        torch.testing.assert_close(q, q_ref.view(3, 8, 4)[:, r * 8 // tp:(r + 1) * 8 // tp]
                                   .reshape(3, -1))
        # query head h attends KV head h // 4; this rank's KV heads are the ones its queries need
        first_q = r * 8 // tp
        kvh = list(range(first_q // 4, first_q // 4 + layer.num_kv_heads))
        torch.testing.assert_close(k, k_ref.view(3, 2, 4)[:, kvh].reshape(3, -1))
        torch.testing.assert_close(v, v_ref.view(3, 2, 4)[:, kvh].reshape(3, -1))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_gate_up(ckpt, tp):
    tensors, f = ckpt
    x = torch.randn(2, 16)
    stats = LoadStats()

    def build(g):
        layer = MergedColumnParallelLinear(16, [24, 24], g)
        layer.weight_loader(layer.weight, _lazy(f, "w", stats), 0)
        layer.weight_loader(layer.weight, _lazy(f, "w2", stats), 1)
        return layer

    outs, _ = _on_ranks(tp, build, lambda m: m(x))
    gate = torch.cat([o.chunk(2, -1)[0] for o in outs], -1)
    up = torch.cat([o.chunk(2, -1)[1] for o in outs], -1)
    torch.testing.assert_close(gate, F.linear(x, tensors["w"]))
    torch.testing.assert_close(up, F.linear(x, tensors["w2"]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_and_head_with_padding(ckpt, tp):
    tensors, f = ckpt  # vocab 37 does not split evenly: the last rank holds padding
    ids = torch.tensor([0, 5, 36, 18, 9, 36])
    h = torch.randn(4, 16)
    stats = LoadStats()

    def build(g):
        emb = VocabParallelEmbedding(37, 16, g)
        emb.weight_loader(emb.weight, _lazy(f, "emb", stats))
        head = ParallelLMHead(37, 16, g)
        head.weight_loader(head.weight, _lazy(f, "emb", stats))
        return emb, head

    outs, _ = _on_ranks(tp, build, lambda m: (m[0](ids), m[1](h)))
    for rank, (e, logits) in enumerate(outs):
        torch.testing.assert_close(e, F.embedding(ids, tensors["emb"]))
        if rank == 0:  # only rank 0 samples: only it gets the logits
            torch.testing.assert_close(logits, F.linear(h, tensors["emb"]))
        else:
            assert logits is None
    assert stats.bytes_read == 2 * 37 * 16 * 4  # across all ranks: each row read once per layer
