"""Typed messages between the engine and its workers, encoded as msgpack.

Only the classes registered here can be decoded, and numpy arrays travel as raw buffers with
their dtype and shape: plain data, never pickle. A step carries new requests in full and running
ones as deltas (their id and the one token sampled last step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import numpy as np

_NDARRAY = 1


@dataclass
class NewRequest:
    req_id: str
    token_ids: list[int]
    sampling: dict[str, Any]  # SamplingParams.to_wire()


@dataclass
class StepInput:
    new_requests: list[NewRequest] = field(default_factory=list)  # prefill their prompts
    decode_ids: list[str] = field(default_factory=list)  # one new token each
    decode_tokens: np.ndarray | None = None  # (len(decode_ids),) int64: that token
    finished_ids: list[str] = field(default_factory=list)  # release before this step
    return_logits: bool = False


@dataclass
class StepOutput:
    req_ids: list[str]  # new requests first, then decodes, in input order
    token_ids: np.ndarray  # (B,) int64 sampled tokens
    logits: np.ndarray | None = None  # (B, V) float32, when asked
    comm_seconds: float = 0.0  # rank 0's time in collectives during this step


@dataclass
class WorkerInit:
    rank: int
    world_size: int
    store_port: int
    device_kind: str
    device_index: int
    cores: list[int]
    memory_budget: int
    model_path: str
    dtype: str
    max_model_len: int
    shm_path: str | None = None  # shared-memory collectives file (CPU groups on one host)
    shm_slot_bytes: int = 0


@dataclass
class Call:
    """A control verb: run ``method`` (one of the worker's allowed methods) on every rank."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    value: Any = None


@dataclass
class Error:
    message: str


@dataclass
class Shutdown:
    pass


_TYPES = {cls.__name__: cls for cls in (NewRequest, StepInput, StepOutput, WorkerInit, Call,
                                        Reply, Error, Shutdown)}


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return msgpack.ExtType(_NDARRAY, msgpack.packb(
            [arr.dtype.str, list(arr.shape), arr.tobytes()]))
    if type(obj).__name__ in _TYPES and type(obj) is _TYPES[type(obj).__name__]:
        return {"__msg__": type(obj).__name__,
                **{f.name: getattr(obj, f.name) for f in fields(obj)}}
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    raise TypeError(f"cannot send {type(obj).__name__} between processes")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY:
        raise ValueError(f"unknown message extension {code}")
    dtype, shape, buf = msgpack.unpackb(data)
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)


def _object_hook(d: dict) -> Any:
    name = d.pop("__msg__", None)
    if name is None:
        return d
    if name not in _TYPES:
        raise ValueError(f"unknown message type {name!r}")
    return _TYPES[name](**d)


def encode(msg: Any) -> bytes:
    return msgpack.packb(msg, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, object_hook=_object_hook, raw=False,
                           strict_map_key=False)
