"""One loader for every family: walk the checkpoint's tensors, map each name to a parameter,
and let the parameter's ``weight_loader`` read its slice.

Reads go through ``safe_open(...).get_slice(name)[...]``, which reads only the requested rows
or columns from the file, so a rank never materialises a full tensor it does not own.
``LoadStats`` counts the bytes read, which a test compares with the bytes the rank holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


@dataclass
class LoadStats:
    bytes_read: int = 0  # checkpoint bytes read from disk (in the file's dtype)
    largest_read: int = 0  # largest single read, in bytes
    tensors: int = 0


@dataclass
class LazyTensor:
    """A checkpoint tensor not yet read; ``read`` fetches a slice along one dim, cast to dtype."""

    name: str
    slice_: object
    dtype: torch.dtype
    stats: LoadStats = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.slice_.get_shape())

    def read(self, dim: int | None = None, start: int = 0, stop: int | None = None
             ) -> torch.Tensor:
        if dim is None:
            t = self.slice_[:]
        elif dim == 0:
            t = self.slice_[start:stop]
        elif dim == 1:
            t = self.slice_[:, start:stop]
        else:
            raise ValueError(f"slicing dim {dim} of {self.name} is not supported")
        nbytes = t.numel() * t.element_size()
        self.stats.bytes_read += nbytes
        self.stats.largest_read = max(self.stats.largest_read, nbytes)
        return t.to(self.dtype)


def _default_loader(param: nn.Parameter, src: LazyTensor, shard_id=None) -> None:
    if tuple(param.shape) != src.shape:
        raise ValueError(f"{src.name}: checkpoint shape {src.shape} != model shape "
                         f"{tuple(param.shape)}")
    param.data.copy_(src.read())


def checkpoint_files(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index when there is one."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(Path(folder) / f) for name, f in weight_map.items()}
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: str(path) for name in f.keys()})  # noqa: SIM118
    return out


def load_weights(model: nn.Module, folder: str, dtype: torch.dtype) -> LoadStats:
    """Fill every parameter of ``model`` from the checkpoint in ``folder``; raise on a missing
    or unexpected tensor. A model that holds only part of the checkpoint (a pipeline stage)
    says which tensors it reads (``holds_weight``); the others are never opened.

    A module's ``process_weights_after_loading`` (packing, quantization) runs as soon as its
    own parameters are all read, so each layer's full-precision copy is freed as loading goes
    and the load peaks near the converted model's size, not twice it."""
    stats = LoadStats()
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    ignored = getattr(model, "ignored_weights", ())
    tied: dict[str, str] = getattr(model, "tied_weights", {})
    aliases: dict[str, str] = getattr(model, "weight_aliases", {})
    holds = getattr(model, "holds_weight", lambda name: True)
    loaded: set[str] = set()
    shards: set[tuple[str, object]] = set()  # (merged parameter, shard) pairs filled
    by_file: dict[str, list[str]] = {}
    remaining: dict[str, int] = {}  # parameter -> checkpoint tensors still to read into it
    for name, path in checkpoint_files(folder).items():
        if any(s in name for s in ignored) or not holds(name):
            continue
        by_file.setdefault(path, []).append(name)
        target = _map_name(name, packed, aliases)[0]
        remaining[target] = remaining.get(target, 0) + 1
    hooks = _Hooks(model, tied, remaining)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                target, shard_id = _map_name(name, packed, aliases)
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} ({Path(path).name}) matches no "
                                     f"parameter of {type(model).__name__}")
                param = params[target]
                loader = getattr(param, "weight_loader", _default_loader)
                loader(param, LazyTensor(name, f.get_slice(name), dtype, stats), shard_id)
                stats.tensors += 1
                loaded.add(target)
                shards.add((target, shard_id))
                remaining[target] -= 1
                if not _missing_shards({target}, shards, packed):
                    hooks.read(target)
    missing = [n for n in params if n not in loaded and not _is_tied(model, n, loaded)]
    missing += _missing_shards(loaded, shards, packed)
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks tensors for: {', '.join(missing[:5])}")
    hooks.run_rest()
    return stats


class _Hooks:
    """Runs each module's ``process_weights_after_loading`` once, when every parameter it owns
    directly is complete: all its checkpoint tensors read (for a tied parameter, those under
    its own name, if any, and those of the one it is tied to)."""

    def __init__(self, model: nn.Module, tied: dict[str, str], remaining: dict[str, int]):
        self.tied, self.remaining = tied, remaining
        self.pending: dict[str, tuple[nn.Module, list[str]]] = {}
        self.owners: dict[str, list[str]] = {}  # parameter -> modules waiting on it
        for mname, module in model.named_modules(remove_duplicate=False):
            if not hasattr(module, "process_weights_after_loading") or mname in self.pending:
                continue
            own = [f"{mname}.{n}" if mname else n
                   for n, _ in module.named_parameters(recurse=False, remove_duplicate=False)]
            self.pending[mname] = (module, own)
            for p in own:
                self.owners.setdefault(p, []).append(mname)
                if p in tied:
                    self.owners.setdefault(tied[p], []).append(mname)

    def _complete(self, p: str) -> bool:
        left = self.remaining.get(p)
        if p in self.tied:  # one tensor, maybe under both names
            return not left and self._complete(self.tied[p])
        return left == 0

    def read(self, target: str) -> None:
        for mname in self.owners.get(target, ()):
            entry = self.pending.get(mname)
            if entry is not None and all(self._complete(p) for p in entry[1]):
                del self.pending[mname]
                entry[0].process_weights_after_loading()

    def run_rest(self) -> None:
        for module, _ in list(self.pending.values()):
            module.process_weights_after_loading()
        self.pending.clear()


def _map_name(name: str, packed: dict[str, tuple[str, object]],
              aliases: dict[str, str] | None = None) -> tuple[str, object]:
    if aliases and name in aliases:
        return aliases[name], None
    for part, (merged, shard_id) in packed.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{merged}."), shard_id
    return name, None


def _missing_shards(loaded: set[str], shards: set[tuple[str, object]],
                    packed: dict[str, tuple[str, object]]) -> list[str]:
    """Checkpoint names of the parts of merged parameters that were never read: a fused
    ``qkv_proj`` whose ``k_proj`` is absent would otherwise run on uninitialised memory."""
    out = []
    for target in sorted(loaded):
        for part, (merged, shard_id) in packed.items():
            if f".{merged}." in target and (target, shard_id) not in shards:
                out.append(target.replace(f".{merged}.", f".{part}."))
    return out


def _is_tied(model: nn.Module, name: str, loaded: set[str]) -> bool:
    tied = getattr(model, "tied_weights", {})
    return name in tied and tied[name] in loaded
