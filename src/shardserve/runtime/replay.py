"""Decode steps replayed: a decode step's native kernel calls, recorded once per batch size and
run again with each later step's inputs copied into the buffers they were recorded on.

At one to a few sequences a decode step of a small model spends much of its time around its
kernels, not in them: Python and PyTorch's dispatch for the ~130 calls of a step, and after
each linear layer has streamed megabytes of weights through the caches, the first Python and
PyTorch code after it finds its own data evicted (a 768-wide RMSNorm takes ~9 us called
alone and ~50 us right after a 6 MB layer on the machines of benchmarks/RESULTS.md). A step
whose batch size was recorded runs its recorded calls in one loop instead: the same kernels
with the same arguments on the same shapes, so the same results bit for bit (tests compare),
on buffers kept for that size. (CUDA graphs do this for GPU kernel launches.)

A recording is kept only where everything between the embedding and the logits ran native
kernels: any PyTorch operation that computes (anything but views and allocations) is a path
the replay would skip, so that batch size is then never replayed and runs as before.
Replays serve steps of one-token sequences only, at most ``MAX_ROWS`` of them, at tp=1 and
pp=1 (a collective between kernels would have to run inside the loop), for models that
split their forward at the embedding (``from_embeddings``). ``SHARDSERVE_REPLAY=0`` turns
it off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shardserve.kernels import ops
from shardserve.layers.attention import AttentionMetadata
from shardserve.planner.memory import REPLAY_ROWS

log = logging.getLogger(__name__)

MAX_ROWS = REPLAY_ROWS

_aten = torch.ops.aten
# Operations that compute nothing: views, allocations and metadata.
_SHAPE_OPS = {_aten.empty, _aten.empty_like, _aten.new_empty, _aten.empty_strided,
              _aten.view, _aten._unsafe_view, _aten.reshape, _aten.split,
              _aten.split_with_sizes, _aten.slice, _aten.select, _aten.as_strided,
              _aten.alias, _aten.detach, _aten.t, _aten.transpose, _aten.unsqueeze,
              _aten.squeeze, _aten.expand, _aten.permute, _aten.unbind, _aten.chunk,
              _aten.narrow, _aten.flatten}


class _Watch(TorchDispatchMode):
    """Keeps every tensor made inside it alive (the recorded calls write into them) and notes
    the first operation that computed."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list = []
        self.computed = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in _SHAPE_OPS and self.computed is None:
            self.computed = func
        self.kept.append(out)
        return out


@dataclass
class _Program:
    x: torch.Tensor  # (N, H) embedded tokens
    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor  # (N, max_blocks)
    context: torch.Tensor
    calls: list
    logits: torch.Tensor  # written by the calls
    kept: list


def replays_enabled() -> bool:
    return os.environ.get("SHARDSERVE_REPLAY", "1").lower() not in ("0", "off", "false")


class Replay:
    """Recorded decode steps of one model, by batch size."""

    def __init__(self, model, max_blocks: int, max_bytes: int) -> None:
        """``max_bytes``: what all recordings may keep (the memory plan reserves it:
        ``planner/memory.replay_bytes``)."""
        self.model, self.max_blocks, self.max_bytes = model, max_blocks, max_bytes
        self.programs: dict[int, _Program | None] = {}
        self.replays = 0  # steps served from a recording
        self.kept_bytes = 0

    @staticmethod
    def takes(meta: AttentionMetadata, n: int) -> bool:
        """Whether this step may be replayed: every token a one-token sequence's, few."""
        return not meta.prefills and meta.num_decodes == n and 1 <= n <= MAX_ROWS

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
               ) -> torch.Tensor:
        """The step's logits (N, V), from its recording (made now if this size has none).
        The tensor is the recording's: valid until the next step."""
        n = ids.shape[0]
        x = self.model.embed(ids)
        if n not in self.programs:
            program, logits = self._record(x, positions, meta)
            self.programs[n] = program
            return logits
        p = self.programs[n]
        if p is None:
            return self.model.from_embeddings(x, positions, meta)
        p.x.copy_(x)
        p.positions.copy_(positions)
        p.slots.copy_(meta.slot_mapping)
        p.tables[:, :meta.decode_tables.shape[1]].copy_(meta.decode_tables)
        p.context.copy_(meta.decode_context)
        for fn, args in p.calls:
            fn(*args)
        self.replays += 1
        return p.logits

    def _record(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[_Program | None, torch.Tensor]:
        """Run the step on buffers of its own, recording its native calls; the program (None
        where some of it ran PyTorch) and the step's logits."""
        n, width = meta.decode_tables.shape
        tables = meta.decode_tables.new_zeros(n, max(self.max_blocks, width))
        tables[:, :width] = meta.decode_tables
        p = _Program(x.clone(), positions.clone(), meta.slot_mapping.clone(), tables,
                     meta.decode_context.clone(), [], None, [])
        watch = _Watch()
        with ops.recording() as calls, watch:
            logits = self.model.from_embeddings(
                p.x, p.positions, AttentionMetadata(p.slots, n, p.tables, p.context, []))
        if watch.computed is not None:
            log.info("decode steps of %d sequences are not replayed: %s runs in PyTorch",
                     n, watch.computed)
            return None, logits
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [p.x, p.positions, p.slots, p.tables, p.context, *watch.kept]
                    if isinstance(t, torch.Tensor)}
        size = sum(storages.values())
        if self.kept_bytes + size > self.max_bytes:
            return None, logits
        self.kept_bytes += size
        p.calls, p.logits, p.kept = list(calls), logits, watch.kept
        return p, logits
