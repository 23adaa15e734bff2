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

from shardserve.kernels import ops
from shardserve.planner.recsys import TablePlan, TableShard, plan_tables
from shardserve.planner.specs import DLRMSpec
from shardserve.runtime.group import Group


class TableShardModule(nn.Module):
    """Rows ``start .. stop - 1`` of one table: a view of the rank's one buffer of shards
    (``DLRM.rows``), so loading fills the buffer a lookup reads."""

    def __init__(self, shard: TableShard, rows: torch.Tensor) -> None:
        super().__init__()
        self.shard = shard
        self.weight = nn.Parameter(rows, requires_grad=False)
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, src, shard_id=None) -> None:
        if src.shape[1] != param.shape[1] or src.shape[0] < self.shard.stop:
            raise ValueError(f"{src.name}: checkpoint shape {src.shape}; the model expects "
                             f"at least {self.shard.stop} rows of {param.shape[1]}")
        param.data.copy_(src.read(0, self.shard.start, self.shard.stop))


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
        mine = self.plan.on(group.rank)
        # All of this rank's shards in one buffer, one after another (TorchRec's "table
        # batched" layout): a lookup is one embedding_bag over every feature this rank holds.
        total = sum(sh.rows for sh in mine)
        self.rows = torch.empty(max(1, total), spec.embedding_dim)
        base, at = [], 0
        for sh in mine:
            base.append(at)
            at += sh.rows
        self.tables = nn.ModuleDict({str(sh.table): TableShardModule(
            sh, self.rows[b:b + sh.rows]) for sh, b in zip(mine, base, strict=True)})
        F_ = spec.num_tables  # per feature: held here, its first row, first local row, rows
        self.held = torch.zeros(F_, dtype=torch.bool)
        self.base = torch.zeros(F_, dtype=torch.long)
        self.start = torch.zeros(F_, dtype=torch.long)
        self.count = torch.zeros(F_, dtype=torch.long)
        for sh, b in zip(mine, base, strict=True):
            self.held[sh.table], self.base[sh.table] = True, b
            self.start[sh.table], self.count[sh.table] = sh.start, sh.rows
        self.features = [sh.table for sh in mine]
        self.first = torch.where(self.held, self.base, -1)  # the native kernel's base
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
        out = ops.pool_bags(self.rows, values, lengths, self.first, self.start, self.count)
        if out is None:
            out = self._pooled_torch(values, lengths)
        out = self.group.all_reduce(out)
        if self.spec.pooling == "mean":
            out /= lengths.t().clamp(min=1).unsqueeze(-1).to(out.dtype)
        return out

    def _pooled_torch(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``pooled`` without the native kernel."""
        F_, B = lengths.shape
        out = torch.zeros(B, F_, self.spec.embedding_dim, dtype=torch.float32,
                          device=values.device)
        if self.features:
            # each id's feature; keep the ids of features held here, in rows held here
            feature = torch.repeat_interleave(torch.arange(F_), lengths.sum(1))
            keep = self.held[feature]
            ids, feature = values[keep], feature[keep]
            local = ids - self.start[feature]
            mine = (local >= 0) & (local < self.count[feature])
            index = torch.where(mine, local + self.base[feature], 0)
            held = lengths[self.features]  # (held features, B): one bag each, in order
            flat = held.reshape(-1)
            offsets = torch.cumsum(flat, 0) - flat
            pooled = F.embedding_bag(index, self.rows, offsets, mode="sum",
                                     per_sample_weights=mine.to(self.rows.dtype))
            out[:, self.features] = pooled.view(len(self.features), B, -1).transpose(0, 1) \
                .float()
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
