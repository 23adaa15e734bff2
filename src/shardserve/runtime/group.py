"""Process groups as objects handed to layers: no default group, no module state.

``TorchGroup`` wraps one ``torch.distributed`` process group (gloo on CPU, NCCL on CUDA).
``FakeGroup.make(n)`` gives ``n`` groups whose collectives meet across threads of one process,
so sharding logic is a plain unit test.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch

from shardserve.runtime.shm import ShmExchange


class Group(Protocol):
    rank: int
    size: int
    comm_seconds: float  # wall time spent in collectives, for measuring their share of a step

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor: ...
    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None: ...
    def barrier(self) -> None: ...


class TorchGroup:
    """One ``torch.distributed`` group. Sum all-reduce happens in place and returns ``x``.
    With ``shm`` (CPU ranks on one host), tensors that fit a slot skip gloo."""

    def __init__(self, pg: object, rank: int, size: int, shm: ShmExchange | None = None) -> None:
        self.pg, self.rank, self.size, self.shm = pg, rank, size, shm
        self.comm_seconds = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            parts = self.shm.exchange(x)
            x.copy_(parts[0])
            for p in parts[1:]:
                x.add_(p)
        else:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.pg)
        self.comm_seconds += time.perf_counter() - t0
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            out = torch.cat(self.shm.exchange(x), dim=dim)
        else:
            import torch.distributed as dist

            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.pg)
            out = torch.cat(parts, dim=dim)
        self.comm_seconds += time.perf_counter() - t0
        return out

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's ``x`` concatenated on rank 0; None on the others."""
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            parts = self.shm.exchange(x)
        else:
            import torch.distributed as dist

            parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
            dist.gather(x.contiguous(), parts, dst=0, group=self.pg)
        out = torch.cat(parts, dim=dim) if self.rank == 0 else None
        self.comm_seconds += time.perf_counter() - t0
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.pg)


class FakeGroup:
    """In-process stand-in: ``make(n)`` returns n ranks whose collectives meet across threads.
    With ``n == 1`` every collective is the identity."""

    def __init__(self, rank: int, size: int, shared: _Shared | None = None) -> None:
        self.rank, self.size = rank, size
        self.comm_seconds = 0.0
        self._shared = shared or _Shared(size)

    @staticmethod
    def make(size: int) -> list[FakeGroup]:
        shared = _Shared(size)
        return [FakeGroup(r, size, shared) for r in range(size)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = self._shared.exchange(self.rank, x.clone())
        x.copy_(torch.stack(parts).sum(0))
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        return torch.cat(self._shared.exchange(self.rank, x.clone()), dim=dim)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        out = self.all_gather(x, dim)
        return out if self.rank == 0 else None

    def barrier(self) -> None:
        self._shared.exchange(self.rank, None)


class _Shared:
    """A rendezvous of ``size`` threads: each deposits a value, all read the full list."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[object] = [None] * size
        self.barrier = threading.Barrier(size)

    def exchange(self, rank: int, value: object) -> list:
        if self.size == 1:
            return [value]
        self.values[rank] = value
        self.barrier.wait()
        out = list(self.values)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read
        return out
