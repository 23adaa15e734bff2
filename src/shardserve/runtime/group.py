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
    With ``shm`` (CPU ranks on one host), tensors that fit a slot skip gloo. ``rank`` is the
    rank inside the group (a pipeline stage's tp group is a subgroup of the world)."""

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
            dist.gather(x.contiguous(), parts, group=self.pg, group_dst=0)
        out = torch.cat(parts, dim=dim) if self.rank == 0 else None
        self.comm_seconds += time.perf_counter() - t0
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.pg)


class StageFailed(RuntimeError):
    """The previous pipeline stage failed this step (its own rank reported why)."""


class PipeLink:
    """Hidden states between pipeline stages: this rank and the rank of the same tp index in
    the previous and next stage (world ranks ``prev`` / ``next``; None at the ends).

    A step's tensor has a shape both sides know from the step itself, so only its bytes
    travel, plus one trailing element that says whether the sender failed: a stage that
    raises still sends, and the next one raises ``StageFailed`` instead of waiting forever.
    Sends are asynchronous (the next micro-batch starts while this one travels); a buffer is
    kept until its send completes."""

    def __init__(self, prev: int | None, next: int | None) -> None:
        self.prev, self.next = prev, next
        self.wait_seconds = 0.0  # in recv: transfer plus the time the previous stage took
        self._sending: list[tuple[object, torch.Tensor]] = []

    def send(self, parts: tuple[torch.Tensor, ...] | None, numel: int,
             dtype: torch.dtype) -> None:
        """``parts`` laid end to end (``numel`` elements of ``dtype`` in all; the receiver
        sees them stacked), or None to say this stage failed. Each part is copied once, into
        the buffer that travels."""
        import torch.distributed as dist

        self._sending = [(w, b) for w, b in self._sending if not w.is_completed()]
        buf = torch.empty(numel + 1, dtype=dtype)
        if parts is None:
            buf.fill_(1)
        else:
            at = 0
            for p in parts:
                buf[at:at + p.numel()].view(p.shape).copy_(p)
                at += p.numel()
            buf[-1] = 0
        self._sending.append((dist.isend(buf, self.next), buf))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch.distributed as dist

        t0 = time.perf_counter()
        numel = 1
        for n in shape:
            numel *= n
        buf = torch.empty(numel + 1, dtype=dtype)
        dist.recv(buf, self.prev)
        self.wait_seconds += time.perf_counter() - t0
        if buf[-1].item() != 0:
            raise StageFailed("the previous pipeline stage failed this step")
        return buf[:-1].view(shape)

    def flush(self) -> None:
        """Wait for every send in flight."""
        for w, _ in self._sending:
            w.wait()
        self._sending.clear()


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
