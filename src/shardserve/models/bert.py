"""BERT-family encoders: ``BertModel`` (hidden states, pooled by the runner) and
``BertForSequenceClassification``, from the same parallel layers as the decoders.

Attention is bidirectional over each padded batch row, with padding masked; QKV and the
MLP's first layer split by output, the projections back by input (one all-reduce each), so a
layer costs two all-reduces as in the decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.layers.embedding import VocabParallelEmbedding
from shardserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.layers.norm import LayerNorm
from shardserve.planner.specs import EncoderSpec
from shardserve.runtime.group import Group


class BertEmbeddings(nn.Module):
    def __init__(self, spec: EncoderSpec, group: Group) -> None:
        super().__init__()
        h = spec.hidden_size
        self.word_embeddings = VocabParallelEmbedding(spec.vocab_size, h, group)
        self.position_embeddings = nn.Embedding(spec.max_position, h)
        self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, h)
        for emb in (self.position_embeddings, self.token_type_embeddings):
            emb.weight.requires_grad_(False)
        self.LayerNorm = LayerNorm(h, spec.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids.flatten()).view(*ids.shape, -1)
        x = x + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, spec: EncoderSpec, group: Group) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                     spec.num_heads, group, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv
        q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        q, k, v = (t.view(B, T, -1, qkv.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        return out.transpose(1, 2).reshape(B, T, -1)


class BertLayer(nn.Module):
    def __init__(self, spec: EncoderSpec, group: Group) -> None:
        super().__init__()
        h, i, eps = spec.hidden_size, spec.intermediate_size, spec.layer_norm_eps
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(spec, group)
        self.attention.output = nn.Module()
        self.attention.output.dense = RowParallelLinear(h, h, group, bias=True)
        self.attention.output.LayerNorm = LayerNorm(h, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = ColumnParallelLinear(h, i, group, bias=True)
        self.output = nn.Module()
        self.output.dense = RowParallelLinear(i, h, group, bias=True)
        self.output.LayerNorm = LayerNorm(h, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention
        x = a.output.LayerNorm(x + a.output.dense(a.self(x, mask)))
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + y)


class BertModel(nn.Module):
    """Last hidden states of a padded batch; ``attention_mask`` marks real tokens."""

    packed_modules_mapping = {
        "self.query": ("self.qkv", "q"),
        "self.key": ("self.qkv", "k"),
        "self.value": ("self.qkv", "v"),
    }
    ignored_weights = ("pooler.", "position_ids")

    def __init__(self, spec: EncoderSpec, max_len: int, group: Group) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(spec, group)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(spec, group)
                                           for _ in range(spec.num_layers))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, attention_mask: (B, T) -> (B, T, H)."""
        mask = attention_mask.bool()[:, None, None, :]  # keys each query may see
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class BertForSequenceClassification(nn.Module):
    """Logits (B, num_labels) from the [CLS] position through HF's pooler and classifier."""

    packed_modules_mapping = BertModel.packed_modules_mapping
    ignored_weights = ("position_ids",)

    def __init__(self, spec: EncoderSpec, max_len: int, group: Group) -> None:
        super().__init__()
        self.bert = BertModel(spec, max_len, group)
        self.bert.pooler = nn.Module()
        self.bert.pooler.dense = nn.Linear(spec.hidden_size, spec.hidden_size)
        self.classifier = nn.Linear(spec.hidden_size, spec.num_labels)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.bert(ids, attention_mask)[:, 0]
        return self.classifier(torch.tanh(self.bert.pooler.dense(cls)))
