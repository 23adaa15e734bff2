"""Rotary position embedding in the Hugging Face layout (``rotate_half``), with Llama-3 scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from shardserve.kernels import ops
from shardserve.planner.specs import RopeSpec


def inv_frequencies(head_dim: int, rope: RopeSpec) -> torch.Tensor:
    inv = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rope.rope_type != "llama3":
        return inv
    # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, a smooth ramp between.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv / rope.factor + smooth * inv, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeSpec) -> None:
        super().__init__()
        inv = inv_frequencies(head_dim, rope).float()
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (P, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (P, hd)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (N, nh, hd), k: (N, nkv, hd), positions: (N,). The native kernel rotates q and k
        in place (they are views of the QKV projection's fresh output)."""
        if ops.rotary_(q, k, self.cos, self.sin, positions):
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # (N, 1, hd)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
