"""DLRM (TorchRec's layout) with its embedding tables sharded over a group.

Each rank holds the table shards ``planner/recsys.py`` gives it (whole tables, or a range of
rows of a row-wise table), reading only those rows from the checkpoint, and the dense MLPs
(replicated). A lookup runs on every rank: each pools the ids that fall in its rows (a
row-wise table's partial sums), an all-reduce sums the pooled ``(B, F, D)`` block so every
rank has every feature, and rank 0 runs the bottom MLP, the pairwise dot interaction, the top
MLP and the sigmoid. Checkpoint names are TorchRec's DLRM's:
``sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{f}.weight``,
``dense_arch.model._mlp.{i}._linear.{weight,bias}``,
``over_arch.model.0._mlp.{i}._linear.{weight,bias}`` and ``over_arch.model.1.{weight,bias}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.planner.recsys import TablePlan, TableShard, plan_tables
from shardserve.planner.specs import DLRMSpec
from shardserve.runtime.group import Group


class TableShardModule(nn.Module):
    """Rows ``start .. stop - 1`` of one table."""

    def __init__(self, shard: TableShard, dim: int) -> None:
        super().__init__()
        self.shard = shard
        self.weight = nn.Parameter(torch.empty(shard.rows, dim), requires_grad=False)
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, src, shard_id=None) -> None:
        if src.shape[1] != param.shape[1] or src.shape[0] < self.shard.stop:
            raise ValueError(f"{src.name}: checkpoint shape {src.shape}; the model expects "
                             f"at least {self.shard.stop} rows of {param.shape[1]}")
        param.data.copy_(src.read(0, self.shard.start, self.shard.stop))

    def pool(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Sum of the rows of ``ids`` this shard holds, per bag (``offsets`` start each bag)."""
        s = self.shard
        if not s.row_wise:
            return F.embedding_bag(ids, self.weight, offsets, mode="sum").float()
        mine = (ids >= s.start) & (ids < s.stop)
        local = (ids - s.start).clamp(0, max(0, s.rows - 1))
        if s.rows == 0:  # an empty last range: nothing here
            return self.weight.new_zeros(len(offsets), self.weight.shape[1])
        return F.embedding_bag(local, self.weight, offsets, mode="sum",
                               per_sample_weights=mine.to(self.weight.dtype)).float()


def _mlp(shapes: list[tuple[str, int, int]]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(i, o) for _, i, o in shapes)


class DLRM(nn.Module):
    def __init__(self, spec: DLRMSpec, max_len: int, group: Group,
                 plan: TablePlan | None = None) -> None:
        super().__init__()
        self.spec, self.group = spec, group
        self.plan = plan or plan_tables(spec, group.size, "float32")
        shapes = spec.mlp_shapes()
        n_dense = len(spec.dense_layers)
        self.dense = _mlp(shapes[:n_dense])
        self.over = _mlp(shapes[n_dense:])
        self.tables = nn.ModuleDict({str(s.table): TableShardModule(s, spec.embedding_dim)
                                     for s in self.plan.on(group.rank)})
        # checkpoint name -> parameter name
        self.weight_aliases = {spec.table_name(s.table): f"tables.{s.table}.weight"
                               for s in self.plan.on(group.rank)}
        for k, (prefix, _, _) in enumerate(shapes):
            mine = f"dense.{k}" if k < n_dense else f"over.{k - n_dense}"
            self.weight_aliases[f"{prefix}.weight"] = f"{mine}.weight"
            self.weight_aliases[f"{prefix}.bias"] = f"{mine}.bias"
        self.register_buffer("triu", torch.triu_indices(spec.num_tables + 1,
                                                        spec.num_tables + 1, offset=1),
                             persistent=False)

    def holds_weight(self, name: str) -> bool:
        """This rank reads the MLPs and its own tables' rows, never another rank's table."""
        return name in self.weight_aliases

    def pooled(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, F, D)`` float32 pooled embeddings of every feature, on every rank.
        ``values``: ids feature by feature, sample by sample within a feature;
        ``lengths``: ``(F, B)`` ids per feature and sample."""
        F_, B = lengths.shape
        out = torch.zeros(B, F_, self.spec.embedding_dim, dtype=torch.float32,
                          device=values.device)
        # every bag's offset within its feature's ids, and where each feature's ids start:
        # two ops for all features, then views (a lookup is a few small ops a table)
        offsets = torch.cumsum(lengths, 1) - lengths
        ends = torch.cumsum(lengths.sum(1), 0).tolist()
        for key, table in self.tables.items():
            f = int(key)
            ids = values[(ends[f - 1] if f else 0):ends[f]]
            out[:, f] = table.pool(ids, offsets[f])
        out = self.group.all_reduce(out)
        if self.spec.pooling == "mean":
            out /= lengths.t().clamp(min=1).unsqueeze(-1).to(out.dtype)
        return out

    def forward(self, dense: torch.Tensor, values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor | None:
        """Scores ``(B,)`` in [0, 1] on rank 0; None on the others (they only pool)."""
        sparse = self.pooled(values, lengths)
        if self.group.rank != 0:
            return None
        dtype = self.over[0].weight.dtype
        x = dense.to(dtype)
        for layer in self.dense:
            x = F.relu(layer(x))
        combined = torch.cat([x.unsqueeze(1), sparse.to(dtype)], dim=1)
        dots = torch.bmm(combined, combined.transpose(1, 2))
        x = torch.cat([x, dots[:, self.triu[0], self.triu[1]]], dim=1)
        for layer in self.over[:-1]:
            x = F.relu(layer(x))
        return torch.sigmoid(self.over[-1](x)).squeeze(1).float()
