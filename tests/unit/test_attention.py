"""Attention over the paged cache, decode and prefill: the native CPU kernels and the PyTorch
path against attention written out densely, sequence by sequence."""

import shutil

import pytest
import torch

from shardserve import kernels
from shardserve.kernels import ops
from shardserve.layers.attention import (
    Attention,
    AttentionMetadata,
    CPUPagedBackend,
    PrefillChunk,
    TorchSDPABackend,
    default_backend,
)


def _dense(q, k_cache, v_cache, tables, context, window):
    """Each sequence's keys and values in order, softmax(q k^T / sqrt(d)) v per head."""
    nh, nkv, hd = q.shape[1], k_cache.shape[2], q.shape[2]
    out = torch.empty_like(q)
    for d in range(q.shape[0]):
        n = int(context[d])
        k = k_cache[tables[d]].flatten(0, 1)[:n]  # (n, nkv, hd)
        v = v_cache[tables[d]].flatten(0, 1)[:n]
        first = max(0, n - window) if window else 0
        for h in range(nh):
            kv = h // (nh // nkv)
            s = (k[first:, kv] @ q[d, h].double()) * hd ** -0.5
            out[d, h] = (torch.softmax(s, 0) @ v[first:, kv]).to(out.dtype)
    return out


def _case(D, nh, nkv, hd, bs, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = 9
    num_blocks = D * max_blocks + 3
    k_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g, dtype=torch.float64)
    # Blocks in random order, as the block manager hands them out; contexts cover a single
    # token, whole blocks and partly filled last blocks.
    tables = torch.randperm(num_blocks, generator=g)[:D * max_blocks].view(D, max_blocks)
    context = torch.randint(1, max_blocks * bs + 1, (D,), generator=g)
    context[0] = 1
    if D > 2:
        context[1], context[2] = bs, max_blocks * bs
    q = torch.randn(D, nh, hd, generator=g, dtype=torch.float64)
    attn = Attention(nh, nkv, hd, window)
    attn.k_cache, attn.v_cache = k_cache.float(), v_cache.float()
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), D, tables, context)
    want = _dense(q, k_cache, v_cache, tables, context, window)
    return attn, q.float(), meta, want.float()


SHAPES = [  # num_heads, num_kv_heads, head_dim, block_size, sliding window
    (12, 4, 64, 16, None),  # llama-110m: grouped-query
    (8, 8, 128, 16, None),  # multi-head, wide heads
    (4, 1, 72, 8, 21),  # multi-query, head_dim not a multiple of 16, sliding window
    (6, 2, 20, 16, None),  # head_dim not a multiple of 8: the kernel declines, PyTorch runs
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("D", [1, 7])
def test_decode_backends_match_dense_attention(shape, D, monkeypatch):
    attn, q, meta, want = _case(D, *shape)
    got = TorchSDPABackend()._decode(attn, q, meta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    native = default_backend()
    if not isinstance(native, CPUPagedBackend):
        pytest.skip("the native kernel does not build here")
    if shape[2] % 8 == 0:  # the kernel must run itself, not fall back
        monkeypatch.setattr(TorchSDPABackend, "_decode", None)
    got = native._decode(attn, q, meta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_16_bit_cache_is_read_as_its_values(shape, kv_dtype, monkeypatch):
    """A bfloat16 / float16 KV cache (a 16-bit checkpoint's): both backends read each stored
    value exactly (float32 arithmetic), so they equal dense attention over the rounded cache;
    the write path rounds float32 keys and values into it."""
    attn, q, meta, _ = _case(5, *shape, seed=3)
    attn.k_cache, attn.v_cache = attn.k_cache.to(kv_dtype), attn.v_cache.to(kv_dtype)
    want = _dense(q.double(), attn.k_cache.double(), attn.v_cache.double(), meta.decode_tables,
                  meta.decode_context, shape[4]).float()
    torch.testing.assert_close(TorchSDPABackend()._decode(attn, q, meta), want,
                               atol=2e-5, rtol=1e-4)
    native = default_backend()
    if isinstance(native, CPUPagedBackend):
        if shape[2] % 8 == 0:
            monkeypatch.setattr(TorchSDPABackend, "_decode", None)
        torch.testing.assert_close(native._decode(attn, q, meta), want, atol=2e-5, rtol=1e-4)
    k, v = torch.randn(2, attn.num_kv_heads, attn.head_dim), torch.randn(2, attn.num_kv_heads,
                                                                         attn.head_dim)
    meta.slot_mapping = torch.tensor([3, 17])
    for backend in (TorchSDPABackend(), native):
        attn.k_cache.zero_()
        backend.write_kv(attn, k, v, meta)
        flat = attn.k_cache.view(-1, *k.shape[1:])
        assert flat.dtype == kv_dtype and torch.equal(flat[[3, 17]], k.to(kv_dtype))
        assert torch.equal(attn.v_cache.view(-1, *v.shape[1:])[[3, 17]], v.to(kv_dtype))
        assert not flat[[0, 4]].any()


PREFILL_SHAPES = [  # num_heads, num_kv_heads, head_dim, sliding window
    (12, 4, 64, None),  # llama-110m: grouped-query
    (8, 8, 128, None),  # multi-head, wide heads
    (4, 1, 80, 21),  # multi-query, head_dim 5 x 16, a window shorter than the chunk
    (6, 2, 48, 300),  # a window longer than the context
    (2, 1, 20, None),  # head_dim not a multiple of 16 (nor 8): the kernel declines
]


def _dense_prefill(q, k, v, window):
    """q (n, nh, hd): the last n positions of a context with keys / values (ctx, nkv, hd)."""
    n, nh, hd = q.shape
    ctx, nkv = k.shape[:2]
    out = torch.empty(n, nh, hd, dtype=torch.float64)
    for i in range(n):
        pos = ctx - n + i
        first = max(0, pos + 1 - window) if window else 0
        for h in range(nh):
            kv = h // (nh // nkv)
            s = (k[first:pos + 1, kv].double() @ q[i, h].double()) * hd ** -0.5
            out[i, h] = torch.softmax(s, 0) @ v[first:pos + 1, kv].double()
    return out.float()


@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=str)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_chunks_match_dense_attention(shape, kv_dtype, monkeypatch):
    """A step of one decode and three prefill chunks: a whole prompt (its own float32 keys),
    a chunk after 37 cached tokens (keys from the cache, a partly filled last block) and a
    one-token chunk; then a 1100-token prompt alone. Every backend equals dense causal
    attention per sequence, and so does the native prefill kernel called on each chunk.
    Where it takes the head size the backend runs it for the chunk of 64 tokens or more (the
    PyTorch path removed for a step of that chunk alone), SDPA for the shorter ones, and the
    1100-key context, past the kernel's cap, is PyTorch's."""
    nh, nkv, hd, window = shape
    g = torch.Generator().manual_seed(hd + nh)
    bs = 16
    attn = Attention(nh, nkv, hd, window)
    attn.k_cache = torch.randn(20, bs, nkv, hd, generator=g).to(kv_dtype)
    attn.v_cache = torch.randn(20, bs, nkv, hd, generator=g).to(kv_dtype)
    order = torch.randperm(20, generator=g)  # blocks in the order a block manager hands out
    N = 1 + 70 + 29 + 1
    q = torch.randn(N, nh, hd, generator=g)
    k, v = torch.randn(N, nkv, hd, generator=g), torch.randn(N, nkv, hd, generator=g)
    prefills, wants, start, used = [], [], 1, 0
    for n, ctx in [(70, 70), (29, 66), (1, 5)]:
        table = order[used:used + -(-ctx // bs)]
        used += len(table)
        rows = slice(start, start + n)
        pos = torch.arange(ctx - n, ctx)
        slots = table[pos // bs] * bs + pos % bs
        attn.k_cache.view(-1, nkv, hd)[slots] = k[rows].to(kv_dtype)
        attn.v_cache.view(-1, nkv, hd)[slots] = v[rows].to(kv_dtype)
        own = n == ctx  # a whole prompt attends to the step's float32 keys, not the cache's
        keys = k[rows] if own else attn.k_cache[table].flatten(0, 1)[:ctx].float()
        values = v[rows] if own else attn.v_cache[table].flatten(0, 1)[:ctx].float()
        prefills.append(PrefillChunk(table, start, n, ctx))
        wants.append(_dense_prefill(q[rows], keys, values, window))
        start += n
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), 1, order[None, :1],
                             torch.tensor([3]), prefills)
    native = default_backend()
    runs = isinstance(native, CPUPagedBackend) and hd % 16 == 0
    results = []
    real = ops.prefill_attention
    monkeypatch.setattr(ops, "prefill_attention",
                        lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
    for backend in (TorchSDPABackend(), native):
        out = backend.attend(attn, q, k, v, meta)
        for chunk, want in zip(prefills, wants, strict=True):
            got = out[chunk.start:chunk.start + chunk.num_tokens]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert len(results) == (1 if isinstance(native, CPUPagedBackend) else 0)  # the 70
    assert all((r is not None) == runs for r in results)
    if runs:
        for chunk, want in zip(prefills, wants, strict=True):  # the kernel at every size
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.num_tokens == chunk.context_len:
                keys, values = k[rows], v[rows]
            else:
                keys, values = (c[chunk.block_ids].flatten(0, 1)[:chunk.context_len].float()
                                for c in (attn.k_cache, attn.v_cache))
            got = real(q[rows], keys, values, window, hd ** -0.5)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        only = AttentionMetadata(torch.zeros(0, dtype=torch.long), 0, None, None,
                                 prefills[:1])  # one chunk alone: the kernel's output is the step's
        with monkeypatch.context() as m:
            m.setattr(TorchSDPABackend, "_prefill", None)
            got = native.attend(attn, q, k, v, only)
        torch.testing.assert_close(got, wants[0], atol=2e-5, rtol=1e-4)
    n = 1100
    q, k, v = (torch.randn(n, h, hd, generator=g) for h in (nh, nkv, nkv))
    results.clear()
    long = AttentionMetadata(torch.zeros(0, dtype=torch.long), 0, None, None,
                             [PrefillChunk(torch.zeros(0, dtype=torch.long), 0, n, n)])
    got = native.attend(attn, q, k, v, long)
    torch.testing.assert_close(got[-50:], _dense_prefill(q[-50:], k, v, window),
                               atol=2e-5, rtol=1e-4)
    assert all(r is None for r in results)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_native_cache_write_rounds_as_pytorch_does(kv_dtype):
    """``ops.write_kv``: the QKV output's strided k and v views into their slots in one pass,
    rounded to nearest even as ``Tensor.to`` (ties, NaN, infinities, values past float16's
    range included)."""
    from shardserve.kernels import ops

    nkv, hd = 2, 8
    qkv = torch.randn(5, (4 + 2 * nkv) * hd) * 100
    qkv[0, 32:40] = torch.tensor([1.00390625, 1.01171875, float("nan"), float("inf"),
                                  -float("inf"), 70000.0, -1e-40, 3.0e-8])
    k = qkv[:, 32:48].view(5, nkv, hd)
    v = qkv[:, 48:64].view(5, nkv, hd)
    cache_k = torch.zeros(4, 4, nkv, hd, dtype=kv_dtype)
    cache_v = torch.zeros_like(cache_k)
    slots = torch.tensor([15, 0, 7, 8, 2])
    if not ops.write_kv(k, v, cache_k, cache_v, slots):
        pytest.skip("the native kernels do not build here")
    want_k, want_v = torch.zeros_like(cache_k), torch.zeros_like(cache_v)
    want_k.view(-1, nkv, hd)[slots] = k.to(kv_dtype)
    want_v.view(-1, nkv, hd)[slots] = v.to(kv_dtype)
    # bit for bit but for the NaN's payload (a NaN either way)
    torch.testing.assert_close(cache_k, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cache_v, want_v, rtol=0, atol=0, equal_nan=True)
    assert not ops.write_kv(k.double(), v.double(), cache_k, cache_v, slots)  # declines


def test_native_kernel_is_the_default_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the PyTorch path is the default")
    assert isinstance(default_backend(), CPUPagedBackend)


def test_kernel_build_failure_falls_back_with_the_compiler_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SHARDSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    assert kernels.load.__wrapped__("paged_attention") is None
    assert "failed on paged_attention.c" in caplog.text
    monkeypatch.setenv("SHARDSERVE_KERNELS", "0")
    assert kernels.load.__wrapped__("paged_attention") is None
