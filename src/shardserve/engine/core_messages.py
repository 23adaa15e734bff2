"""Typed messages between the API process and an engine core (``engine/core.py``), on the
same msgpack codec as the workers' (``runtime/messages.py``): registered dataclasses and plain
data, nothing pickled.

The API side sends requests in full once (``AddRequest``) and then only aborts; the core
answers once per loop turn with one ``CoreOutputs``: each updated request's new tokens,
logprobs and finish reasons (``RequestDelta``), the requests it refused, the aborts it has
applied, and its load. Text is never sent: the API side detokenizes (``engine/detokenizer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardserve.runtime.messages import register


@dataclass
class CoreInit:
    """Everything the core needs to build its engine, as plain data."""

    model: dict[str, Any]  # ModelConfig's fields
    tp: int
    devices: list[dict[str, Any]]  # Device's fields, one per rank
    cache: dict[str, Any]  # CacheConfig's fields
    scheduler: dict[str, Any]  # SchedulerConfig's fields
    label: str
    step_timeout_s: float
    health_check_s: float  # how often an idle core pings its workers
    ping_timeout_s: float
    cpus: list[int] = field(default_factory=list)  # run the core here (empty: anywhere)
    log_level: int = 30  # the server's (logging.WARNING)
    precision: dict[str, Any] | None = None  # Precision's fields, as the host chose them
    pp: int = 1  # pipeline stages (devices: tp x pp)
    pipeline_split: str | None = None  # layers per stage ("5,3", "7.5,4.5"); None: even
    executor: str = "local"  # or "ray"
    ray_address: str | None = None


@dataclass
class CoreReady:
    """The engine is built and its workers have loaded."""


@dataclass
class CoreFailed:
    """The core could not start (``starting``) or its worker group failed; it exits next."""

    message: str
    starting: bool = False
    bad_config: bool = False  # a ValueError at start: the model or its settings are wrong


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams' fields
    prompt: str | None = None
    cache_salt: str | None = None
    features: Any = None  # a speech request's log-mel features: (mels, frames) float32 ndarray


@dataclass
class Abort:
    """Abort these requests; ``ack`` (if set) comes back in ``CoreOutputs.acks`` once their
    blocks are free."""

    request_ids: list[str]
    ack: int | None = None


@dataclass
class Ping:
    n: int


@dataclass
class Stop:
    """Stop the workers and exit."""


@dataclass
class SeqDelta:
    index: int  # which of the request's n completions
    token_ids: list[int]  # sampled since the last delta
    logprobs: list[dict[int, float]] | None = None  # one entry per new token, if asked
    finish_reason: str | None = None  # set once, in the delta that finishes it
    stop_text_len: int | None = None  # a stop string matched: the text ends here


@dataclass
class RequestDelta:
    request_id: str
    seqs: list[SeqDelta]
    finished: bool = False
    num_cached_tokens: int = 0
    error: str | None = None  # why it failed, safe to show a client


@dataclass
class Refusal:
    """A request the core did not take: ``kind`` is "invalid" (400, ``param`` names the
    field), "unavailable" (503) or "failed" (500)."""

    request_id: str
    kind: str
    message: str
    param: str | None = None


@dataclass
class CoreOutputs:
    outputs: list[RequestDelta] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    pongs: list[int] = field(default_factory=list)
    load: list[float] = field(default_factory=lambda: [0, 0, 0.0])  # running, waiting, KV use


register(CoreInit, CoreReady, CoreFailed, AddRequest, Abort, Ping, Stop, SeqDelta,
         RequestDelta, Refusal, CoreOutputs)
