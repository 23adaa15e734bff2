"""Attention over a KV cache, in plain PyTorch (``scaled_dot_product_attention``).

The cache of one layer on one rank is two tensors ``(num_slots, max_len, kv_heads, head_dim)``:
one contiguous row per running sequence. A step carries a flat batch of tokens from several
sequences; ``AttentionMetadata`` says which slot and position each token has. New keys and
values are written into the cache first, then each query attends to its sequence's cache up to
and including its own position (causal), within the sliding window if the layer has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch; built once per step, shared by every layer."""

    token_slots: torch.Tensor  # (N,) cache slot of each token
    positions: torch.Tensor  # (N,) position of each token in its sequence
    slots: torch.Tensor  # (B,) cache slot of each sequence
    query_lens: list[int]  # (B,) new tokens of each sequence in this step
    context_lens: list[int]  # (B,) cached length after this step's tokens are written
    is_decode: bool  # every sequence has exactly one new token

    @property
    def max_context(self) -> int:
        return max(self.context_lens)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.window = sliding_window
        self.k_cache: torch.Tensor | None = None  # (S, L, nkv, hd), set by the model runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: (N, nh, hd); k, v: (N, nkv, hd) -> (N, nh * hd)."""
        self.k_cache[meta.token_slots, meta.positions] = k
        self.v_cache[meta.token_slots, meta.positions] = v
        out = self._decode(q, meta) if meta.is_decode else self._prefill(q, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence: all sequences in one padded SDPA call."""
        L = meta.max_context
        k = self.k_cache[meta.slots, :L].transpose(1, 2)  # (B, nkv, L, hd)
        v = self.v_cache[meta.slots, :L].transpose(1, 2)
        key_pos = torch.arange(L, device=q.device)
        ctx = torch.tensor(meta.context_lens, device=q.device)
        mask = key_pos[None, :] < ctx[:, None]  # (B, L)
        if self.window is not None:
            mask &= key_pos[None, :] > (ctx[:, None] - 1 - self.window)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)  # (B, nh, 1, hd)
        return out.squeeze(2)

    def _prefill(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Sequences one by one; each query attends causally to its cached prefix."""
        outs, start = [], 0
        for slot, n, ctx in zip(meta.slots.tolist(), meta.query_lens, meta.context_lens,
                                strict=True):
            qi = q[start:start + n].transpose(0, 1)  # (nh, n, hd)
            k = self.k_cache[slot, :ctx].transpose(0, 1)  # (nkv, ctx, hd)
            v = self.v_cache[slot, :ctx].transpose(0, 1)
            mask = None
            if n != ctx or self.window is not None:
                q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
                k_pos = torch.arange(ctx, device=q.device)[None, :]
                mask = k_pos <= q_pos
                if self.window is not None:
                    mask &= k_pos > q_pos - self.window
            out = F.scaled_dot_product_attention(
                qi, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads)  # (nh, n, hd)
            outs.append(out.transpose(0, 1))
            start += n
        return torch.cat(outs)
