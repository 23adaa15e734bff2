"""Attention over a paged KV cache, in plain PyTorch (``scaled_dot_product_attention``).

The cache of one layer on one rank is two tensors ``(num_blocks, block_size, kv_heads,
head_dim)``. A step carries a flat batch of tokens: first the sequences with one new token
(decodes), then prefill chunks. New keys and values are scattered into their slots first;
then decodes attend in one padded SDPA call over their gathered blocks, and each prefill chunk
attends causally to its sequence's cached prefix plus itself. Writing every token's K/V before
any read also makes it correct for a sequence to read blocks another one fills in the same
step. ``AttentionMetadata`` is built once per step and shared by every layer.

The computation sits behind ``AttentionBackend``: ``TorchSDPABackend`` runs anywhere PyTorch
does; ``CPUPagedBackend`` replaces its decode half on CPUs with a native kernel that reads the
blocks in place (``kernels/paged_attention.c``), 4-9x faster than gather + SDPA at 64 sequences
(``benchmarks/kernels.py``), and prefill chunks of 64 tokens or more over up to 1024 keys
with a native kernel that computes each KV head's scores for all the query heads sharing it
(``kernels/prefill_attention.c``: 128 tokens of llama-110m 0.24 ms a layer against SDPA's
0.35). A fused kernel for CUDA can implement the same two methods.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.kernels import ops


@dataclass
class PrefillChunk:
    block_ids: torch.Tensor  # (nb,) blocks covering the context
    start: int  # first row of this chunk in the flat batch
    num_tokens: int
    context_len: int  # cached tokens after this chunk


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) cache slot (block * block_size + offset) of each token
    num_decodes: int  # the first D tokens are one-token sequences
    decode_tables: torch.Tensor | None  # (D, max_blocks) padded block tables
    decode_context: torch.Tensor | None  # (D,) context length of each decode
    prefills: list[PrefillChunk] = field(default_factory=list)
    cross: object | None = None  # an encoder-decoder's cross-attention slots (models/whisper.py)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, block_size: int, window: int | None) -> torch.Tensor:
        """(D, 1, 1, L) keys each decode may see; computed once per step per window size."""
        if window not in self._masks:
            L = self.decode_tables.shape[1] * block_size
            pos = torch.arange(L, device=self.decode_context.device)[None, :]
            ctx = self.decode_context[:, None]
            mask = pos < ctx
            if window is not None:
                mask &= pos > ctx - 1 - window
            self._masks[window] = mask[:, None, None, :]
        return self._masks[window]


class AttentionBackend(Protocol):
    def write_kv(self, attn: Attention, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Store the step's keys and values (N, nkv, hd) in their cache slots."""

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        """Queries (N, nh, hd) against the cache -> (N, nh, hd). ``k``, ``v``: the step's own
        keys and values (N, nkv, hd), already in the cache; a chunk that is its sequence's
        whole context may attend to them directly."""


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None,
                 backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.window = sliding_window
        self.backend = backend or default_backend()
        self.k_cache: torch.Tensor | None = None  # (num_blocks, bs, nkv, hd), set by the runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: (N, nh, hd); k, v: (N, nkv, hd) -> (N, nh * hd)."""
        self.backend.write_kv(self, k, v, meta)
        return self.backend.attend(self, q, k, v, meta).view(q.shape[0], -1)


class TorchSDPABackend:
    """Gather each sequence's blocks and call ``scaled_dot_product_attention``: decodes in one
    padded call, prefill chunks one by one."""

    def write_kv(self, attn: Attention, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        # (the cache may be narrower than the activations: a 16-bit cache, float32 compute)
        attn.k_cache.view(-1, *k.shape[1:]).index_copy_(0, meta.slot_mapping,
                                                        k.to(attn.k_cache.dtype))
        attn.v_cache.view(-1, *v.shape[1:]).index_copy_(0, meta.slot_mapping,
                                                        v.to(attn.v_cache.dtype))

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        if not meta.prefills:  # a decode step: the decodes' output is the whole output
            return self._decode(attn, q, meta)
        if not meta.num_decodes and len(meta.prefills) == 1:  # one chunk: its output is
            return self._chunk(attn, q, k, v, meta.prefills[0])
        out = q.new_empty(q.shape)
        if meta.num_decodes:
            out[:meta.num_decodes] = self._decode(attn, q[:meta.num_decodes], meta)
        for chunk in meta.prefills:
            out[chunk.start:chunk.start + chunk.num_tokens] = self._chunk(attn, q, k, v, chunk)
        return out

    def _chunk(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               chunk: PrefillChunk) -> torch.Tensor:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        if chunk.num_tokens == chunk.context_len:  # nothing cached before it: its own
            return self._prefill(attn, q[rows], k[rows], v[rows], chunk)
        # the cache may be narrower than the activations (a 16-bit cache): read as q's dtype
        kv = (self._gather(c, chunk.block_ids)[:chunk.context_len].to(q.dtype)
              for c in (attn.k_cache, attn.v_cache))
        return self._prefill(attn, q[rows], *kv, chunk)

    @staticmethod
    def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """(..., nb) block ids -> (..., nb * bs, nkv, hd) keys or values in order."""
        return cache[tables].flatten(-4, -3)  # (..., nb, bs, nkv, hd) -> (..., L, nkv, hd)

    def _decode(self, attn: Attention, q: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor:
        # (D, nkv, L, hd)
        k = self._gather(attn.k_cache, meta.decode_tables).to(q.dtype).transpose(1, 2)
        v = self._gather(attn.v_cache, meta.decode_tables).to(q.dtype).transpose(1, 2)
        mask = meta.decode_mask(attn.k_cache.shape[1], attn.window)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask, scale=attn.scale,
            enable_gqa=attn.num_heads != attn.num_kv_heads)  # (D, nh, 1, hd)
        return out.squeeze(2)

    def _prefill(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 chunk: PrefillChunk) -> torch.Tensor:
        """q (n, nh, hd) of a chunk against k, v (ctx, nkv, hd) in q's dtype: its context's
        keys and values, from the cache or (a chunk that is the whole context) the step's own."""
        n, ctx, window = chunk.num_tokens, chunk.context_len, attn.window
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (nkv, ctx, hd)
        mask = None
        if n != ctx or window is not None:
            q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
        # With a batch dimension PyTorch's CPU SDPA takes its flash kernel (GQA and a boolean
        # mask included); 3-D inputs fall to the math path: 8x slower at a 2048-token chunk.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
            scale=attn.scale, enable_gqa=attn.num_heads != attn.num_kv_heads)  # (1, nh, n, hd)
        return out[0].transpose(0, 1)


class CPUPagedBackend(TorchSDPABackend):
    """Decodes through the native paged-attention kernel (float32 queries on CPU, a float32 or
    16-bit cache, head_dim a multiple of 8), prefill chunks of 64 tokens or more over up to
    1024 keys through the native prefill kernel, and writes the cache with one native pass;
    the rest through ``TorchSDPABackend``."""

    def write_kv(self, attn: Attention, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        if not ops.write_kv(k, v, attn.k_cache, attn.v_cache, meta.slot_mapping):
            super().write_kv(attn, k, v, meta)

    # Chunks of fewer query tokens stay with SDPA, faster there (llama-110m heads, 2 threads:
    # a 16-token prompt 0.028 against 0.041 ms, one token after 511 cached 0.077 against
    # 0.107; from 64 tokens the kernel is 1.2-1.6x faster up to its 1024 keys).
    MIN_PREFILL_TOKENS = 64

    def _prefill(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 chunk: PrefillChunk) -> torch.Tensor:
        out = None
        if chunk.num_tokens >= self.MIN_PREFILL_TOKENS:
            out = ops.prefill_attention(q, k, v, attn.window, attn.scale)
        return out if out is not None else super()._prefill(attn, q, k, v, chunk)

    def _decode(self, attn: Attention, q: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor:
        out = ops.paged_decode_attention(q, attn.k_cache, attn.v_cache, meta.decode_tables,
                                         meta.decode_context, attn.num_kv_heads, attn.window,
                                         attn.scale)
        return out if out is not None else super()._decode(attn, q, meta)


@functools.cache
def default_backend() -> AttentionBackend:
    """The native CPU backend where its kernel builds here, else plain PyTorch."""
    return CPUPagedBackend() if ops.available() else TorchSDPABackend()
