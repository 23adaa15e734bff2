"""Whisper (``WhisperForConditionalGeneration``): an audio encoder and a text decoder, from
the same parallel layers as the Llama family, heads split over the tensor-parallel group.

The encoder runs once per sequence (``encode``: log-mel frames -> two convolutions with GELU,
the second of stride 2 -> sinusoidal positions as stored -> pre-LayerNorm transformer layers
with bidirectional attention -> a final LayerNorm), and each decoder layer's cross-attention
keys and values of those states go to the sequence's slot of the cross-attention cache
(``cross_kv``; the runner owns the slots). The decoder is a step of the paged engine like any
decoder's: token embedding plus learned positions, then per layer self-attention over the paged
KV cache, cross-attention over its sequence's slot, and a GELU MLP, each pre-LayerNorm with a
residual; the head is tied to the token embedding. Keys have no bias in Whisper.

Convolutions, positions and LayerNorms are replicated; attention projections and MLPs split
as in the decoders (one all-reduce after each attention's output projection and each MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.kernels import ops
from shardserve.layers.attention import Attention, AttentionMetadata
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from shardserve.layers.norm import LayerNorm
from shardserve.planner.specs import WhisperSpec
from shardserve.runtime.group import Group


@dataclass
class CrossBatch:
    """Which cross-attention slot each sequence of a step reads, built once a step for every
    layer: ``slots`` in the order of the step's sequences, ``rows`` how many of the step's
    tokens each has (the one-token decodes first, as ``AttentionMetadata`` orders them); for
    those ``decodes``, the block table of their slots and their context (the encoder's
    states), as the paged attention kernel takes them."""

    slots: list[int]
    rows: list[int]
    decodes: int
    tables: torch.Tensor  # (decodes, blocks)
    context: torch.Tensor  # (decodes,)

    @staticmethod
    def build(slots: list[int], rows: list[int], spec: WhisperSpec,
              device: torch.device | str = "cpu") -> CrossBatch:
        blocks = spec.cross_blocks[0]
        decodes = next((i for i, n in enumerate(rows) if n != 1), len(rows))
        first = torch.tensor(slots[:decodes], dtype=torch.long, device=device) * blocks
        return CrossBatch(slots, rows, decodes,
                          first[:, None] + torch.arange(blocks, device=device),
                          torch.full((decodes,), spec.max_source_positions, dtype=torch.long,
                                     device=device))


class _Projections(nn.Module):
    """Whisper's q/k/v/out projections (``k_proj`` without a bias), heads split."""

    def __init__(self, d: int, heads: int, group: Group) -> None:
        super().__init__()
        self.q_proj = ColumnParallelLinear(d, d, group, bias=True)
        self.k_proj = ColumnParallelLinear(d, d, group, bias=False)
        self.v_proj = ColumnParallelLinear(d, d, group, bias=True)
        self.out_proj = RowParallelLinear(d, d, group, bias=True)
        self.num_heads, self.head_dim = heads // group.size, d // heads

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)


class WhisperEncoderLayer(nn.Module):
    def __init__(self, spec: WhisperSpec, group: Group) -> None:
        super().__init__()
        d = spec.hidden_size
        self.self_attn = _Projections(d, spec.encoder_heads, group)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5)
        self.fc1 = ColumnParallelLinear(d, spec.encoder_ffn, group, bias=True)
        self.fc2 = RowParallelLinear(spec.encoder_ffn, d, group, bias=True)
        self.final_layer_norm = LayerNorm(d, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        a = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, k, v = (a.heads(p(h)).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        x = x + a.out_proj(out.transpose(1, 2).flatten(2))
        h = self.final_layer_norm(x)
        return x + self.fc2(F.gelu(self.fc1(h)))


class WhisperEncoder(nn.Module):
    def __init__(self, spec: WhisperSpec, group: Group) -> None:
        super().__init__()
        d = spec.hidden_size
        self.conv1 = nn.Conv1d(spec.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(spec.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(spec, group)
                                    for _ in range(spec.encoder_layers))
        self.layer_norm = LayerNorm(d, 1e-5)
        for p in (*self.conv1.parameters(), *self.conv2.parameters(),
                  *self.embed_positions.parameters()):
            p.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, mels, frames) -> (B, frames / 2, d), in the features' dtype (the compute
        dtype: 16-bit convolution weights are widened to it, a small copy per window)."""
        x = features
        for conv in (self.conv1, self.conv2):
            x = F.gelu(F.conv1d(x, conv.weight.to(x.dtype), conv.bias.to(x.dtype),
                                conv.stride, conv.padding))
        x = x.transpose(1, 2) + self.embed_positions.weight[:x.shape[2]].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, spec: WhisperSpec, group: Group) -> None:
        super().__init__()
        d = spec.hidden_size
        self.self_attn = _Projections(d, spec.num_heads, group)
        self.self_attn.attn = Attention(self.self_attn.num_heads, self.self_attn.num_heads,
                                        self.self_attn.head_dim)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5)
        self.encoder_attn = _Projections(d, spec.num_heads, group)
        self.encoder_attn_layer_norm = LayerNorm(d, 1e-5)
        self.fc1 = ColumnParallelLinear(d, spec.intermediate_size, group, bias=True)
        self.fc2 = RowParallelLinear(spec.intermediate_size, d, group, bias=True)
        self.final_layer_norm = LayerNorm(d, 1e-5)
        # this layer's cross-attention cache, set by the runner: (slots x blocks, rows, nh, hd),
        # slot s in blocks s * blocks .. (s + 1) * blocks - 1 (``WhisperSpec.cross_blocks``):
        # the paged KV cache's layout, so the paged attention kernel reads it in place
        self.cross_k: torch.Tensor | None = None
        self.cross_v: torch.Tensor | None = None
        self.blocks, self.rows = spec.cross_blocks
        self.states = spec.max_source_positions

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                cross: CrossBatch) -> torch.Tensor:  # (N, d)
        a = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, k, v = (a.heads(p(h)) for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(a.attn(q, k, v, meta))
        c = self.encoder_attn
        h = self.encoder_attn_layer_norm(x)
        x = x + c.out_proj(self._cross(c.heads(c.q_proj(h)), cross))
        h = self.final_layer_norm(x)
        return x + self.fc2(F.gelu(self.fc1(h)))

    def _cross(self, q: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        """Each token's queries (N, nh, hd) against its sequence's encoder states: the
        one-token sequences in one call of the paged attention kernel over their slots' blocks,
        read in place (gathering 16 sequences' states costs ten times the attention); the
        rest (and everything without the kernel) one sequence at a time."""
        o = ops.paged_decode_attention(q[:cross.decodes], self.cross_k, self.cross_v,
                                       cross.tables, cross.context, q.shape[1], None,
                                       q.shape[-1] ** -0.5) if cross.decodes else None
        if o is not None and cross.decodes == len(cross.rows):  # a decode step: all of it
            return o.flatten(1)
        out = torch.empty_like(q)
        done = 0
        if o is not None:
            out[:cross.decodes], done = o, cross.decodes
        at = done
        for i in range(done, len(cross.rows)):
            n = cross.rows[i]
            k, v = (self._states(c, cross.slots[i]).to(q.dtype)
                    for c in (self.cross_k, self.cross_v))
            o = F.scaled_dot_product_attention(q[at:at + n].transpose(0, 1)[None], k[None],
                                               v[None])  # (1, nh, n, hd)
            out[at:at + n] = o[0].transpose(0, 1)
            at += n
        return out.flatten(1)

    def _states(self, cache: torch.Tensor, slot: int) -> torch.Tensor:
        """A slot's keys or values as (nh, T, hd): a view of its blocks."""
        b = self.blocks
        x = cache[slot * b:(slot + 1) * b].reshape(b * self.rows, *cache.shape[2:])
        return x[:self.states].transpose(0, 1)

    def keep(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a sequence's cross-attention keys and values (nh, T, hd) in ``slot``."""
        for cache, x in ((self.cross_k, k), (self.cross_v, v)):
            self._states(cache, slot).copy_(x)


class WhisperDecoder(nn.Module):
    def __init__(self, spec: WhisperSpec, group: Group) -> None:
        super().__init__()
        d = spec.hidden_size
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, d, group)
        self.embed_positions = nn.Embedding(spec.max_position, d)
        self.embed_positions.weight.requires_grad_(False)
        self.layers = nn.ModuleList(WhisperDecoderLayer(spec, group)
                                    for _ in range(spec.num_layers))
        self.layer_norm = LayerNorm(d, 1e-5)
        self.scale = d ** 0.5 if spec.scale_embedding else 1.0


class WhisperForConditionalGeneration(nn.Module):
    ignored_weights = ("proj_out.",)  # tied to the token embedding (ours: lm_head)

    def __init__(self, spec: WhisperSpec, max_len: int, group: Group) -> None:
        super().__init__()
        if not spec.tie_word_embeddings:
            raise ValueError("Whisper with an untied proj_out is not supported")
        self.spec = spec
        self.model = nn.Module()
        self.model.encoder = WhisperEncoder(spec, group)
        self.model.decoder = WhisperDecoder(spec, group)
        decoder = self.model.decoder
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, group,
                                      decoder.embed_tokens)
        self.tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    @property
    def decoder_layers(self) -> list[WhisperDecoderLayer]:
        return list(self.model.decoder.layers)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, mels, frames) log-mel features -> (B, frames / 2, d) encoder states."""
        return self.model.encoder(features)

    def cross_kv(self, states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of ``states`` (T, d), as
        (nh, T, hd) on this rank."""
        out = []
        for layer in self.decoder_layers:
            c = layer.encoder_attn
            out.append(tuple(c.heads(p(states)).transpose(0, 1) for p in (c.k_proj, c.v_proj)))
        return out

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cross: CrossBatch) -> torch.Tensor:
        """ids, positions: (N,) -> final hidden states (N, d)."""
        dec = self.model.decoder
        x = dec.embed_tokens(ids) * dec.scale + dec.embed_positions.weight[positions]
        for layer in dec.layers:
            x = layer(x, meta, cross)
        return dec.layer_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.decoder_layers]
