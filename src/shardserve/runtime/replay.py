"""Decode steps replayed: a decode step's native kernel calls, recorded once per batch size and
run again with each later step's inputs copied into the buffers they were recorded on.

At one to a few dozen sequences a decode step of a small model spends much of its time around
its kernels, not in them: Python and PyTorch's dispatch for the ~130 calls of a step, and
after each linear layer has streamed megabytes of weights through the caches, the first
Python and PyTorch code after it finds its own data evicted (a 768-wide RMSNorm takes ~9 us
called alone and ~50 us right after a 6 MB layer on the machines of benchmarks/RESULTS.md). A
step whose batch size was recorded runs its recorded calls in one loop instead: the same
kernels with the same arguments on the same shapes, so the same results bit for bit (tests
compare). (CUDA graphs do this for GPU kernel launches.)

A recording keeps no tensor of the step that made it. The step's tensors are laid out again
in one arena by their lifetimes (from the first to the last recorded call whose arguments
point into them), the calls rewritten to those places, and the arena shared by every
recording of the model (one step runs at a time): a recording needs about the activations
alive at once, a layer or two and the logits, not every layer's, so every batch size up to
``max_num_seqs`` can have one within ``planner/memory.replay_bytes``.

A recording is kept only where everything between the embedding (or the previous pipeline
stage) and the logits (or the next stage) ran native kernels: any PyTorch operation that
computes (anything but views and allocations) is a path the replay would skip, so that batch
size is then never replayed and runs as before. Replays serve steps of one-token sequences
only, at tp=1 (a collective between kernels would have to run inside the loop), for models
that split their forward at the embedding (``from_embeddings``); a pipeline stage replays
its own layers between receiving and sending. ``SHARDSERVE_REPLAY=0`` turns it off.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shardserve.kernels import ops
from shardserve.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


_aten = torch.ops.aten
# Operations that compute nothing: views, allocations and metadata.
_SHAPE_OPS = {_aten.empty, _aten.empty_like, _aten.new_empty, _aten.empty_strided,
              _aten.view, _aten._unsafe_view, _aten.reshape, _aten.split,
              _aten.split_with_sizes, _aten.slice, _aten.select, _aten.as_strided,
              _aten.alias, _aten.detach, _aten.t, _aten.transpose, _aten.unsqueeze,
              _aten.squeeze, _aten.expand, _aten.permute, _aten.unbind, _aten.chunk,
              _aten.narrow, _aten.flatten}


class _Watch(TorchDispatchMode):
    """Keeps every tensor made inside it alive (the recorded calls write into them, and no
    address may be reused within the step), up to ``max_bytes`` of storage: past that it
    keeps nothing more (``over``) and the step is not recorded. Notes the first operation
    that computed."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.kept: list = []
        self.storages: set[int] = set()
        self.bytes, self.max_bytes, self.over = 0, max_bytes, False
        self.computed = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in _SHAPE_OPS and self.computed is None:
            self.computed = func
        if not self.over:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and \
                        t.untyped_storage().data_ptr() not in self.storages:
                    self.storages.add(t.untyped_storage().data_ptr())
                    self.bytes += t.untyped_storage().nbytes()
            self.over = self.bytes > self.max_bytes
            self.kept.append(out)
        return out


@dataclass
class _Slot:
    """A tensor at a byte offset of the arena."""

    offset: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype

    def view(self, arena: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype).set_(
            arena.untyped_storage(), self.offset // self.dtype.itemsize, self.shape, self.stride)


@dataclass
class _Program:
    """One batch size's recorded calls, as templates (``args[i]`` for ``i, off in
    relocations`` is the arena's address plus ``off``) and bound to the arena."""

    templates: list  # (function, args, relocations)
    inputs: dict[str, _Slot]  # x, residual (a later stage's), positions, slots, tables, context
    outputs: list[_Slot]  # the logits, or the hidden state and residual for the next stage
    size: int  # arena bytes it needs
    calls: list = field(default_factory=list)  # bound
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    out: torch.Tensor | tuple[torch.Tensor, ...] | None = None  # what a replay returns

    def bind(self, arena: torch.Tensor) -> None:
        base = arena.data_ptr()
        self.calls = []
        for fn, args, relocs in self.templates:
            args = list(args)
            for i, off in relocs:
                args[i] = base + off
            self.calls.append((fn, tuple(args)))
        self.views = {k: s.view(arena) for k, s in self.inputs.items()}
        out = tuple(s.view(arena) for s in self.outputs)
        self.out = out[0] if len(out) == 1 else out


def _lay_out(calls: list, tensors: list[torch.Tensor], first: list[torch.Tensor],
             last: list[torch.Tensor]) -> tuple[dict[int, int], int, list]:
    """Arena offsets for the storages of ``tensors`` that the calls use, by lifetime:
    ``{storage address: offset}``, the arena's size and the calls as templates. ``first``
    are live from before the first call (the inputs), ``last`` until after the last (the
    outputs). Pointers elsewhere (weights, the KV cache) stay as they are."""
    spans: dict[int, list] = {}  # address -> [nbytes, first call, last call]
    for t in tensors:
        st = t.untyped_storage()
        spans.setdefault(st.data_ptr(), [st.nbytes(), None, None])
    bases = sorted(spans)
    ends = [b + spans[b][0] for b in bases]

    def owner(ptr: int) -> int | None:
        i = bisect.bisect_right(bases, ptr) - 1
        return bases[i] if i >= 0 and ptr < ends[i] else None

    def use(base: int, at: int) -> None:
        span = spans[base]
        span[1] = at if span[1] is None else min(span[1], at)
        span[2] = at if span[2] is None else max(span[2], at)

    pointers = []
    for at, (fn, args) in enumerate(calls):
        where = [i for i, kind in enumerate(fn.argtypes) if kind is ctypes.c_void_p
                 and args[i] is not None]
        found = [(i, owner(args[i])) for i in where]
        for _, base in found:
            if base is not None:
                use(base, at)
        pointers.append([(i, base) for i, base in found if base is not None])
    for t in first:
        use(t.untyped_storage().data_ptr(), -1)
    for t in last:
        use(t.untyped_storage().data_ptr(), len(calls))
    # first fit by lifetime: a storage takes the lowest offset no live one overlaps
    offsets: dict[int, int] = {}
    live: list[tuple[int, int, int]] = []  # (offset, end, last call)
    size = 0
    for base in sorted((b for b in bases if spans[b][1] is not None),
                       key=lambda b: spans[b][1]):
        nbytes, start, stop = spans[base]
        live = [x for x in live if x[2] >= start]
        at = 0
        for off, end, _ in sorted(live):
            if at + nbytes <= off:
                break
            at = max(at, -(-end // 64) * 64)
        offsets[base] = at
        live.append((at, at + nbytes, stop))
        size = max(size, at + nbytes)
    templates = [(fn, args, [(i, offsets[base] + args[i] - base) for i, base in ptrs])
                 for (fn, args), ptrs in zip(calls, pointers, strict=True)]
    return offsets, size, templates


def replays_enabled() -> bool:
    return os.environ.get("SHARDSERVE_REPLAY", "1").lower() not in ("0", "off", "false")


class Replay:
    """Recorded decode steps of one model (or pipeline stage), by batch size."""

    def __init__(self, model, max_blocks: int, max_bytes: int, record_bytes: int) -> None:
        """``max_bytes``: what the arena may take (the memory plan reserves it:
        ``planner/memory.replay_bytes``); ``record_bytes``: what a step being recorded may
        keep until it ends (the plan's activation reserve, which a decode step leaves
        mostly unused): a larger batch size is not recorded."""
        self.model, self.max_blocks, self.max_bytes = model, max_blocks, max_bytes
        self.record_bytes = record_bytes
        self.programs: dict[int, _Program | None] = {}
        self.replays = 0  # steps served from a recording
        self.arena = torch.empty(0, dtype=torch.uint8)

    @property
    def kept_bytes(self) -> int:
        return self.arena.numel()

    @staticmethod
    def takes(meta: AttentionMetadata, n: int) -> bool:
        """Whether this step may be replayed: every token a one-token sequence's."""
        return not meta.prefills and meta.num_decodes == n >= 1

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            carried: torch.Tensor | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The step's logits (N, V) on the last stage, else the hidden state and residual for
        the next one; ``carried`` (2, N, H): what the previous stage sent. From its
        recording (made now if this size has none); the tensors are the arena's: valid
        until the next step."""
        n = ids.shape[0]
        x = self.model.embed(ids) if carried is None else carried[0]
        residual = None if carried is None else carried[1]
        if n not in self.programs:
            program, out = self._record(x, residual, positions, meta)
            self.programs[n] = program
            return out
        p = self.programs[n]
        if p is None:
            return self.model.from_embeddings(x, positions, meta, residual)
        v = p.views
        v["x"].copy_(x)
        if residual is not None:
            v["residual"].copy_(residual)
        v["positions"].copy_(positions)
        v["slots"].copy_(meta.slot_mapping)
        v["tables"][:, :meta.decode_tables.shape[1]].copy_(meta.decode_tables)
        v["context"].copy_(meta.decode_context)
        for fn, args in p.calls:
            fn(*args)
        self.replays += 1
        return p.out

    def _record(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata
                ) -> tuple[_Program | None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Run the step on buffers of its own, recording its native calls; the program (None
        where some of it ran PyTorch, or it would not fit) and the step's output."""
        n, width = meta.decode_tables.shape
        tables = meta.decode_tables.new_zeros(n, max(self.max_blocks, width))
        tables[:, :width] = meta.decode_tables
        inputs = {"x": x.clone(), "positions": positions.clone(),
                  "slots": meta.slot_mapping.clone(), "tables": tables,
                  "context": meta.decode_context.clone()}
        if residual is not None:
            inputs["residual"] = residual.clone()
        watch = _Watch(self.record_bytes)
        with ops.recording() as calls, watch:
            out = self.model.from_embeddings(
                inputs["x"], inputs["positions"],
                AttentionMetadata(inputs["slots"], n, inputs["tables"], inputs["context"], []),
                inputs.get("residual"))
        if watch.computed is not None or watch.over:
            log.info("decode steps of %d sequences are not replayed: %s", n,
                     f"{watch.computed} runs in PyTorch" if watch.computed is not None else
                     f"recording them would keep over {self.record_bytes} bytes")
            return None, out
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        tensors = [t for t in [*inputs.values(), *watch.kept] if isinstance(t, torch.Tensor)]
        offsets, size, templates = _lay_out(list(calls), tensors, list(inputs.values()), outs)
        if size > self.max_bytes:
            log.info("decode steps of %d sequences are not replayed: they need %d bytes of "
                     "the %d reserved", n, size, self.max_bytes)
            return None, out

        def slot(t: torch.Tensor) -> _Slot:
            base = t.untyped_storage().data_ptr()
            return _Slot(offsets[base] + t.data_ptr() - base, tuple(t.shape), t.stride(),
                         t.dtype)
        p = _Program(templates, {k: slot(t) for k, t in inputs.items()},
                     [slot(t) for t in outs], size)
        if size > self.arena.numel():  # a larger arena: every recording moves into it
            self.arena = torch.empty(size, dtype=torch.uint8)
            for q in self.programs.values():
                if q is not None:
                    q.bind(self.arena)
        p.bind(self.arena)
        return p, out
