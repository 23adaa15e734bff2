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
    """A sequence the workers hold no state for: its first step, or its first after a
    preemption (then ``token_ids`` includes what it had generated)."""

    req_id: str
    token_ids: list[int]
    prompt_len: int
    block_ids: list[int]
    num_computed: int  # tokens already in the cache (prefix-cache hits)
    sampling: dict[str, Any]  # SamplingParams.to_wire()
    features: np.ndarray | None = None  # (mels, frames) float32 audio of a speech model


@dataclass
class StepInput:
    """One step. Running sequences travel as deltas: tokens appended (the one sampled last
    step) and blocks added since the workers last saw them."""

    new_requests: list[NewRequest] = field(default_factory=list)
    cached_ids: list[str] = field(default_factory=list)
    cached_new_tokens: list[list[int]] = field(default_factory=list)
    cached_new_blocks: list[list[int]] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)  # scheduled, in this order
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute for each
    preempted_ids: list[str] = field(default_factory=list)  # drop their blocks, keep RNG
    finished_ids: list[str] = field(default_factory=list)  # drop everything
    # the one worker appends each token it samples to its sequence (the next step, sent
    # before this one's answer, computes it)
    feed_samples: bool = False


@dataclass
class StepOutput:
    """Rank 0's answer: a token for each sequence whose known tokens are now all computed
    (-1 for a sequence in ``failed``, which the sampler could not serve; the rest went on)."""

    req_ids: list[str]
    token_ids: np.ndarray  # (B,) int64
    logprobs: np.ndarray | None = None  # (B,) float32 log-probability of each sampled token
    top_ids: np.ndarray | None = None  # (B, K) int64, K = largest logprobs asked this step
    top_logprobs: np.ndarray | None = None  # (B, K) float32
    comm_seconds: float = 0.0  # rank 0's time in collectives during this step
    worker_seconds: float = 0.0  # rank 0's time from receiving the step to answering
    failed: dict[str, str] = field(default_factory=dict)  # seq id -> why it has no token


@dataclass
class WorkerInit:
    rank: int
    world_size: int
    store_path: str  # the rendezvous FileStore (a private folder; no TCP listener)
    device_kind: str
    device_index: int
    cores: list[int]
    memory_budget: int
    model_path: str
    dtype: str  # of the linear and embedding weights
    compute_dtype: str  # of activations, norms and biases
    max_model_len: int
    quantization: str | None = None  # of the linear layers and LM head (ModelConfig)
    shm_path: str | None = None  # shared-memory collectives file (CPU groups on one host)
    shm_slot_bytes: int = 0
    kv_cache_dtype: str | None = None  # of the KV cache (None: compute_dtype)
    tp: int = 0  # ranks per pipeline stage (0: world_size, one stage)
    pipeline_split: list[float] | None = None  # layers per stage, in halves (set when pp > 1)
    num_threads: int = 0  # threads when ``cores`` is empty (a Ray actor's CPU count)


@dataclass
class Call:
    """A control verb: run ``method`` (one of the worker's allowed methods) on every rank."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DriverCall:
    """A call run as a step: every rank runs ``method`` (numbered with the steps), only the
    driver answers (a ``Reply``); the others speak only to report an ``Error``. For calls
    whose other ranks take part in collectives and have nothing to return."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    value: Any = None


@dataclass
class Error:
    message: str  # one line, safe to show a client: "ValueError: ..."
    detail: str = ""  # the traceback, for the server's log only
    step: int = -1  # the step it answers (counted from 0 by every rank), -1 for a call


@dataclass
class Shutdown:
    pass


_TYPES = {cls.__name__: cls for cls in (NewRequest, StepInput, StepOutput, WorkerInit, Call,
                                        DriverCall, Reply, Error, Shutdown)}


def register(*classes: type) -> None:
    """Make more dataclasses decodable (the engine core's messages). A name is one class."""
    for cls in classes:
        if _TYPES.setdefault(cls.__name__, cls) is not cls:
            raise ValueError(f"message type {cls.__name__!r} is registered already")


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
