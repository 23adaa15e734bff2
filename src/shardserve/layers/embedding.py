"""Vocabulary-parallel embedding and LM head.

The vocabulary splits into ``ceil(V / tp)`` rows per rank (the last rank's tail is zero
padding). Embedding: each rank looks up the ids it owns, zeroes the rest, and an all-reduce
sums the partial rows. LM head: each rank scores its vocabulary slice and an all-gather
concatenates the slices into full logits on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.kernels import ops
from shardserve.layers.linear import linear, pack_in_place
from shardserve.planner.memory import shard
from shardserve.runtime.group import Group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, group: Group) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.per_rank = shard(vocab_size, group.size)
        self.start = group.rank * self.per_rank
        self.stop = min(self.start + self.per_rank, vocab_size)  # rows that hold real tokens
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.out_dtype: torch.dtype | None = None  # rows handed out in it (None: the table's)
        self.weight_scale: torch.Tensor | None = None  # int8 rows of a quantized tied head

    def weight_loader(self, param: nn.Parameter, src, shard_id=None) -> None:
        n = max(0, self.stop - self.start)
        param.data[n:].zero_()
        if n:
            param.data[:n].copy_(src.read(0, self.start, self.stop))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, H)
        if self.group.size == 1:
            return self._rows(ids)
        owned = (ids >= self.start) & (ids < self.stop)
        y = self._rows((ids - self.start) * owned)
        y.mul_(owned.unsqueeze(-1).to(y.dtype))
        return self.group.all_reduce(y)

    def _rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dim() >= 3:  # a tied head packed the table into panels
            y = ops.packed_rows(w, local_ids)
            if self.weight_scale is not None:  # and quantized them: int8 rows times scales
                scale = self.weight_scale[local_ids].unsqueeze(-1)
                return y.to(scale.dtype).mul_(scale).to(self.out_dtype or scale.dtype)
        else:
            y = F.embedding(local_ids, w)
        return y if self.out_dtype is None else y.to(self.out_dtype)


class ParallelLMHead(nn.Module):
    """Logits over the full vocabulary, gathered on every rank, with the embedding's vocabulary
    partition. Untied it holds its own weight, repacked after loading like every linear
    layer's (``layers.linear.pack_in_place``). Tied to an embedding it shares that
    ``(V_local, H)`` parameter: a float32 one stays as it is; a 16-bit one is packed too (no
    other kernel runs it fast at many rows) and the embedding reads its rows from the
    panels. With ``quantization = "int8"`` the head's weight is int8 panels with a scale per
    vocabulary row; a tied embedding reads its rows from those (one scale per token row)."""

    quantization: str | None = None

    def __init__(self, vocab_size: int, hidden: int, group: Group,
                 tied: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.group, self.vocab_size, self.tied = group, vocab_size, tied is not None
        self.per_rank = shard(vocab_size, group.size)
        self.start = group.rank * self.per_rank
        self.stop = min(self.start + self.per_rank, vocab_size)
        if tied is not None:
            self.weight = tied.weight
        else:
            self.weight = nn.Parameter(torch.empty(self.per_rank, hidden), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        # A plain reference, not a submodule: the table loads under the embedding's name.
        self._tied_to = [tied] if tied is not None else []
        self.weight_scale: torch.Tensor | None = None

    # The same (V_local, H) rows of the same partition as the embedding's.
    weight_loader = VocabParallelEmbedding.weight_loader

    def process_weights_after_loading(self) -> None:
        if not self.tied or self.weight.dtype != torch.float32 or self.quantization:
            # whole panels: a vocabulary slice that is not a multiple of the panel width
            # gets zero rows, whose logits forward drops
            self.weight_scale = pack_in_place(self.weight, self.quantization, pad=True)
            for embedding in self._tied_to:
                embedding.weight_scale = self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:  # (B, H) -> (B, V) on rank 0
        local = linear(x, self.weight, scale=self.weight_scale)
        if local.shape[-1] != self.per_rank:  # panel padding (gather copies the view)
            local = local[..., :self.per_rank]
        full = self.group.gather(local, dim=-1)  # only rank 0 samples
        return None if full is None else full[..., :self.vocab_size]
