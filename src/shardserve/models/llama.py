"""The Llama family: Llama (1-3.x), Mistral and Qwen2 share one decoder.

Differences are data in ``TransformerSpec``: Qwen2's QKV bias, Mistral's sliding window,
Llama-3's RoPE scaling, tied embeddings, grouped-query attention. No rank arithmetic here:
the parallel layers own their sharding. A pipeline stage (``planner/partition.py``) builds
only its own layers (the others are empty placeholders, so parameter names stay the
checkpoint's), the embedding on the first stage and the norm and head on the last; a stage
before the last returns its hidden state and residual for the next.
"""

from __future__ import annotations

import torch
from torch import nn

from shardserve.layers.attention import Attention, AttentionMetadata
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.linear import (
    GateUpParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from shardserve.layers.norm import RMSNorm
from shardserve.layers.rotary import RotaryEmbedding
from shardserve.planner.partition import Stage
from shardserve.planner.specs import TransformerSpec
from shardserve.runtime.group import Group


class LlamaAttention(nn.Module):
    def __init__(self, spec: TransformerSpec, layer: int, rotary: RotaryEmbedding,
                 group: Group) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, group, bias=spec.qkv_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, group)
        self.rotary = rotary
        qkv = self.qkv_proj
        self.attn = Attention(qkv.num_heads, qkv.num_kv_heads, spec.head_dim,
                              spec.sliding_windows[layer])

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj
        q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        n, hd = x.shape[0], qkv.head_dim
        q, k = self.rotary(positions, q.view(n, -1, hd), k.view(n, -1, hd))
        return self.o_proj(self.attn(q, k, v.view(n, -1, hd), meta))


class LlamaMLP(nn.Module):
    def __init__(self, spec: TransformerSpec, group: Group) -> None:
        super().__init__()
        i = spec.intermediate_size
        self.gate_up_proj = GateUpParallelLinear(spec.hidden_size, i, group)
        self.down_proj = RowParallelLinear(i, spec.hidden_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.act(x))


class LlamaDecoderLayer(nn.Module):
    """A decoder layer, or the block of it a pipeline stage holds: the attention block (input
    norm, attention) and the MLP block (post-attention norm, MLP) each run on their own
    (a stage boundary may fall between them: what crosses is the same hidden state and
    residual as between layers)."""

    def __init__(self, spec: TransformerSpec, layer: int, rotary: RotaryEmbedding,
                 group: Group, attention: bool = True, mlp: bool = True) -> None:
        super().__init__()
        if attention:
            self.self_attn = LlamaAttention(spec, layer, rotary, group)
            self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if mlp:
            self.mlp = LlamaMLP(spec, group)
            self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.attend(positions, x, residual, meta)
        return self.feed_forward(x, residual)

    def attend(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        return self.self_attn(positions, x, meta), residual

    def feed_forward(self, x: torch.Tensor, residual: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class MissingLayer(nn.Module):
    """A decoder layer another pipeline stage holds: no parameters, never called."""


class LlamaModel(nn.Module):
    def __init__(self, spec: TransformerSpec, max_len: int, group: Group,
                 stage: Stage) -> None:
        super().__init__()
        self.stage = stage
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, group) \
            if stage.is_first else None
        rotary = RotaryEmbedding(spec.head_dim, max_len, spec.rope)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, i, rotary, group, stage.holds_attention(i),
                              stage.holds_mlp(i)) if i in stage.layers else MissingLayer()
            for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if stage.is_last else None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                carried: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids, positions: (N,) -> hidden states (N, H) on the last stage; on the others
        the hidden state and residual the next stage starts from (``carried`` there,
        stacked: ``(2, N, H)``)."""
        if self.stage.is_first:
            return self.layers_from(self.embed_tokens(ids), None, positions, meta)
        return self.layers_from(carried[0], carried[1], positions, meta)

    def layers_from(self, x: torch.Tensor, residual: torch.Tensor | None,
                    positions: torch.Tensor, meta: AttentionMetadata
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        st = self.stage
        for i in st.layers:
            layer = self.layers[i]
            if st.holds_attention(i):
                x, residual = layer.attend(positions, x, residual, meta)
            if st.holds_mlp(i):
                x, residual = layer.feed_forward(x, residual)
        if not self.stage.is_last:
            return x, residual
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint name part -> (our merged parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    ignored_weights = ("rotary_emb.inv_freq",)

    def __init__(self, spec: TransformerSpec, max_len: int, group: Group,
                 stage: Stage | None = None) -> None:
        super().__init__()
        self.stage = stage = stage or Stage.whole(spec.num_layers)
        self.model = LlamaModel(spec, max_len, group, stage)
        self.tied_weights: dict[str, str] = {}
        self.weight_aliases: dict[str, str] = {}  # checkpoint name -> our parameter
        self.lm_head = None
        if stage.is_last:
            tied = self.model.embed_tokens if spec.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, group, tied)
            if tied is not None:
                self.tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}
            elif spec.tie_word_embeddings:  # the first stage holds the embedding: read a copy
                self.weight_aliases = {"model.embed_tokens.weight": "lm_head.weight"}

    def holds_weight(self, name: str) -> bool:
        """Whether this stage reads checkpoint tensor ``name`` (the loader skips the rest)."""
        st = self.stage
        if name.startswith("model.layers."):
            _, _, layer, block = name.split(".")[:4]
            if block in ("self_attn", "input_layernorm"):
                return st.holds_attention(int(layer))
            if block in ("mlp", "post_attention_layernorm"):
                return st.holds_mlp(int(layer))
            return int(layer) in st.layers
        if name.startswith("model.embed_tokens."):
            return st.is_first or bool(self.weight_aliases)
        if name.startswith(("model.norm.", "lm_head.")):
            return st.is_last
        return True

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                carried: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.model(ids, positions, meta, carried)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(B, H) -> (B, V) on rank 0; None on the other ranks."""
        return self.lm_head(hidden)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def from_embeddings(self, x: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata, residual: torch.Tensor | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This stage's part of a step whose tokens are each its sequence's last, from the
        embedded tokens ``x`` (or, on a later stage, the hidden state and ``residual`` the
        previous one sent): the logits (N, V) on the last stage, else what the next stage
        starts from (runtime/replay.py records this part)."""
        out = self.model.layers_from(x, residual, positions, meta)
        return self.compute_logits(out) if self.stage.is_last else out

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers (their KV cache lives here)."""
        st = self.stage
        return [self.model.layers[i].self_attn.attn for i in st.layers if st.holds_attention(i)]
