"""Embedding tables over devices: which device holds which rows of which table (pure).

As TorchRec's planner names them, a table is placed **table-wise** (whole, on one device) or
**row-wise** (its rows split evenly over every device of the group). The rule: a table larger
than a fair share of all the tables (their bytes / devices) goes row-wise, since no device
could take it whole and stay even; the rest go table-wise, largest first, each to the device
holding the fewest bytes so far. The dense MLPs are replicated on every device. Every rank
computes the same plan from the same inputs, so nothing about it travels between processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.planner.memory import DTYPE_BYTES, format_bytes
from shardserve.planner.specs import DLRMSpec


@dataclass(frozen=True)
class TableShard:
    """The rows ``start .. stop - 1`` of table ``table`` on rank ``rank``."""

    table: int
    rank: int
    start: int
    stop: int
    row_wise: bool

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TablePlan:
    world: int
    shards: tuple[TableShard, ...]
    table_bytes: tuple[int, ...]  # per rank
    dense_bytes: int  # the MLPs, on every rank

    def on(self, rank: int) -> list[TableShard]:
        return [s for s in self.shards if s.rank == rank]

    def kind(self, table: int) -> str:
        return "row_wise" if any(s.row_wise for s in self.shards if s.table == table) \
            else "table_wise"

    def bytes_per_device(self) -> list[int]:
        return [t + self.dense_bytes for t in self.table_bytes]


def dense_params(spec: DLRMSpec) -> int:
    return sum(i * o + o for _, i, o in spec.mlp_shapes())


def plan_tables(spec: DLRMSpec, world: int, dtype: str) -> TablePlan:
    """Every table's shards over ``world`` devices (see the module's docstring)."""
    if world < 1:
        raise ValueError(f"tables over {world} devices: need at least 1")
    row = spec.embedding_dim * DTYPE_BYTES[dtype]
    sizes = [n * row for n in spec.num_embeddings]
    fair = sum(sizes) / world
    load = [0] * world
    shards: list[TableShard] = []
    for t in sorted(range(spec.num_tables), key=lambda t: (-sizes[t], t)):
        n = spec.num_embeddings[t]
        if world > 1 and sizes[t] > fair:
            per = -(-n // world)
            for r in range(world):
                start, stop = min(n, r * per), min(n, (r + 1) * per)
                shards.append(TableShard(t, r, start, stop, True))
                load[r] += (stop - start) * row
        else:
            r = min(range(world), key=lambda i: (load[i], i))
            shards.append(TableShard(t, r, 0, n, False))
            load[r] += sizes[t]
    shards.sort(key=lambda s: (s.table, s.rank))
    return TablePlan(world, tuple(shards), tuple(load),
                     dense_params(spec) * DTYPE_BYTES[dtype])


def check_tables_fit(spec: DLRMSpec, world: int, dtype: str, budget: int,
                     max_world: int | None = None) -> TablePlan:
    """The plan, or ``ValueError`` naming the device over budget, its tables, and the smallest
    number of devices whose plan fits."""
    plan = plan_tables(spec, world, dtype)
    per = plan.bytes_per_device()
    if max(per) <= budget:
        return plan
    worst = max(range(world), key=lambda r: per[r])
    held = ", ".join(f"table {s.table} (rows {s.start}-{s.stop - 1})" if s.row_wise
                     else f"table {s.table} (whole)" for s in plan.on(worst)[:4])
    fits = next((w for w in range(world + 1, 4 * world + 65)
                 if max(plan_tables(spec, w, dtype).bytes_per_device()) <= budget), None)
    hint = (f"shard the tables over tp>={fits} devices" if fits else
            "no number of devices makes the dense layers fit") + " or raise --device-memory"
    if fits and max_world is not None and fits > max_world:
        hint += f" (tp={fits} needs {fits} devices; you have {max_world})"
    raise ValueError(f"device {worst} would hold {format_bytes(per[worst])} ({per[worst]} "
                     f"bytes: {held}{', ...' if len(plan.on(worst)) > 4 else ''} and the "
                     f"dense layers) at tp={world}; the device budget is "
                     f"{format_bytes(budget)} ({budget} bytes); {hint}")
