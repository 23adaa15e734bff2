"""asyncio front of one replica's engine core: streaming outputs, cancellation, supervision.

The engine runs in a core process of its own (``engine/core.py``); this object, in the API
process, sends it requests and aborts, and a reader thread receives one ``CoreOutputs`` per
core step. The reader only queues each request's deltas and wakes the waiting coroutines with
one ``call_soon_threadsafe`` per step; the coroutine turns deltas into outputs (detokenizing
incrementally, ``engine/request_state.py``) when it runs, merging several steps if it fell
behind. Nothing of the engine's loop runs on the event loop or holds this process's GIL.

Every request gets exactly one ending: its last output, or an exception (``InvalidRequest`` at
admission, ``RequestFailed`` when it failed alone, ``EngineUnavailable`` when the core or its
workers failed or the model is being unloaded). When the core is lost (it reported a failed
worker group, exited, or missed the supervisor's health check) every request it held ends with
``EngineUnavailable`` at once and the supervisor starts a new core; requests that arrive
meanwhile are refused the same way. Once stopped, ``generate`` refuses at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from shardserve.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardserve.engine.core_client import CoreClient, Process
from shardserve.engine.core_messages import Abort, AddRequest, CoreInit, CoreOutputs, RequestDelta
from shardserve.engine.errors import EngineUnavailable, InvalidRequest, RequestFailed
from shardserve.engine.request_state import OutputKind, RequestState
from shardserve.engine.supervisor import RestartPolicy, Status, Supervisor
from shardserve.outputs import RequestOutput
from shardserve.runtime.devices import Device
from shardserve.runtime.precision import Precision
from shardserve.runtime.process import Child
from shardserve.sampling_params import SamplingParams

_REFUSALS = {"invalid": InvalidRequest, "unavailable": EngineUnavailable,
             "failed": RequestFailed}


@dataclass(frozen=True)
class Load:
    """What the core last reported, for metrics."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


class _Stream:
    """One request's link from the reader thread to its coroutine."""

    def __init__(self, state: RequestState, client: CoreClient) -> None:
        self.loop = asyncio.get_running_loop()
        self.state, self.client = state, client
        # (arrival time, a delta or the exception that ends the request)
        self.pending: collections.deque = collections.deque()
        self.ready = asyncio.Event()

    @property
    def wakes_each_step(self) -> bool:
        return self.state.kind is not OutputKind.FINAL


class AsyncLLMEngine:
    def __init__(self, launch: Callable[[], Process], name: str = "llm",
                 policy: RestartPolicy | None = None, tokenizer=None,
                 answer_timeout_s: float = 300.0) -> None:
        """``launch`` starts a core (and again after a failure); the first start's error is
        raised here. ``answer_timeout_s``: the longest one step may take."""
        self.name, self.tokenizer = name, tokenizer
        self.load = Load()
        self._streams: dict[str, _Stream] = {}
        self._acks: dict[int, tuple[asyncio.Future, CoreClient]] = {}
        self._ack_ids = itertools.count()
        self._lock = threading.Lock()  # streams, acks and "closed", across threads
        self._closed = False
        self._starting: Process | None = None  # a core still loading (after a failure)

        def start() -> CoreClient:
            process = launch()
            with self._lock:
                self._starting, closed = process, self._closed
            if closed:  # shut down meanwhile: this start fails at once
                process.kill()
            try:
                return CoreClient(process, self._on_outputs, self._on_lost,
                                  answer_timeout_s).start()
            finally:
                with self._lock:
                    self._starting = None

        self._sup: Supervisor[CoreClient] = Supervisor(name, start,
                                                       policy or RestartPolicy())
        self._sup.start()

    @classmethod
    def spawn(cls, model: ModelConfig, devices: list[Device], cache: CacheConfig,
              scheduler: SchedulerConfig, name: str, label: str, tokenizer=None,
              policy: RestartPolicy | None = None, step_timeout_s: float = 300.0,
              cpus: list[int] | None = None, precision: Precision | None = None,
              parallel: ParallelConfig | None = None) -> AsyncLLMEngine:
        """``model`` on ``devices`` (``parallel``: tp x pp; default tp = len(``devices``)),
        its engine core a process of its own (on
        ``cpus`` if given); ``label`` names the core and its workers for ``ps``.
        ``precision``, if the caller chose it, spares the core loading the kernels (and
        torch) to choose it again."""
        policy = policy or RestartPolicy()
        parallel = parallel or ParallelConfig(len(devices))
        init = CoreInit(_fields(model), parallel.tensor_parallel_size,
                        [_fields(d) for d in devices],
                        _fields(cache), _fields(scheduler), label, step_timeout_s,
                        policy.health_check_s, policy.ping_timeout_s, list(cpus or []),
                        logging.getLogger().getEffectiveLevel(),
                        _fields(precision) if precision is not None else None,
                        parallel.pipeline_parallel_size, parallel.pipeline_split,
                        parallel.executor, parallel.ray_address)

        def launch() -> Child:
            core = Child("shardserve.engine.core", f"{label}:core",
                         dict(os.environ, OMP_NUM_THREADS="1"))
            core.send(init)
            return core

        return cls(launch, name, policy, tokenizer, step_timeout_s)

    @property
    def status(self) -> Status:
        return self._sup.status

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, prompt: str | None = None,
                       cache_salt: str | None = None,
                       kind: OutputKind = OutputKind.CUMULATIVE,
                       observe: Callable[[float, RequestDelta], None] | None = None,
                       features=None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs of ``kind``; the last has ``finished`` set. Raises
        ``InvalidRequest``, ``RequestFailed`` or ``EngineUnavailable``. Leaving the iteration
        early aborts the request. ``observe`` sees each delta with the time it arrived from
        the core (``time.perf_counter``), for latency metrics. ``features``: a speech
        model's audio (``engine/speech.py``)."""
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer,
                             kind)
        stream = self._register(request_id, state)
        stream.client.send(AddRequest(request_id, list(prompt_token_ids),
                                      dataclasses.asdict(params), prompt, cache_salt, features))
        try:
            while not state.finished:
                await stream.ready.wait()
                stream.ready.clear()
                while stream.pending:
                    at, item = stream.pending.popleft()
                    if isinstance(item, BaseException):
                        raise item
                    state.update(item)
                    if observe is not None:
                        observe(at, item)
                if state.error is not None and state.finished:
                    raise RequestFailed(state.error)
                out = state.output()
                if out is not None:
                    yield out
        finally:
            with self._lock:
                gone = self._streams.pop(request_id, None) is stream
            if gone and not state.finished:  # the caller went away: free its blocks
                stream.client.send(Abort([request_id]))

    def _register(self, request_id: str, state: RequestState) -> _Stream:
        with self._lock:
            if self._closed:
                raise EngineUnavailable(f"model `{self.name}` was unloaded")
            client = self._sup.engine
            if client is None:
                raise self._unavailable()
            if request_id in self._streams:
                raise InvalidRequest(f"request_id {request_id!r} is already running")
            stream = self._streams[request_id] = _Stream(state, client)
        return stream

    async def abort(self, request_id: str) -> None:
        """Abort a request; when this returns its blocks are free."""
        with self._lock:
            client = self._sup.engine
            if self._closed or client is None:
                return
            n = next(self._ack_ids)
            done = asyncio.get_running_loop().create_future()
            self._acks[n] = (done, client)
        client.send(Abort([request_id], ack=n))
        await done

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let the running ones finish for up to ``drain_timeout_s``
        (then end them), then stop the core and its workers. Blocks: call it off the event
        loop."""
        with self._lock:
            self._closed = True
            starting = self._starting
        if starting is not None:  # a restart may wait long (a Ray cluster without room)
            starting.kill()
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline:
            time.sleep(0.01)
        self._end(lambda s: True, EngineUnavailable(
            f"model `{self.name}` was unloaded before the request finished"))
        self._sup.close()
        self.load = Load()

    # -- the reader thread -----------------------------------------------------------------
    def _on_outputs(self, client: CoreClient, msg: CoreOutputs) -> None:
        woken: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        now = time.perf_counter()
        with self._lock:
            for delta in msg.outputs:
                stream = self._streams.get(delta.request_id)
                if stream is None or stream.client is not client:
                    continue
                stream.pending.append((now, delta))
                if delta.finished:
                    del self._streams[delta.request_id]
                if delta.finished or stream.wakes_each_step:
                    woken[stream.loop].append(stream.ready.set)
            for r in msg.refused:
                stream = self._streams.pop(r.request_id, None)
                if stream is not None:
                    stream.pending.append((now, _REFUSALS[r.kind](r.message, *(
                        [r.param] if r.kind == "invalid" else []))))
                    woken[stream.loop].append(stream.ready.set)
            for n in msg.acks:
                done, _ = self._acks.pop(n, (None, None))
                if done is not None:
                    woken[done.get_loop()].append(_resolver(done))
            if client is self._sup.engine:
                self.load = Load(int(msg.load[0]), int(msg.load[1]), float(msg.load[2]))
        for loop, calls in woken.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_call_all, calls)

    def _on_lost(self, client: CoreClient, error: Exception) -> None:
        self._sup.fail(client, error)
        self._end(lambda s: s.client is client, None, client)

    def _end(self, which: Callable[[_Stream], bool], error: Exception | None,
             client: CoreClient | None = None) -> None:
        """End the streams ``which`` picks with ``error`` (default: the model is
        unavailable, with the supervisor's reason), and release the aborts waiting on
        ``client`` (all, without one)."""
        woken: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        with self._lock:
            for request_id, stream in list(self._streams.items()):
                if which(stream):
                    del self._streams[request_id]
                    stream.pending.append((0.0, error or self._unavailable()))
                    woken[stream.loop].append(stream.ready.set)
            for n, (done, owner) in list(self._acks.items()):
                if client is None or owner is client:
                    del self._acks[n]
                    woken[done.get_loop()].append(_resolver(done))
        for loop, calls in woken.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_call_all, calls)

    def _unavailable(self) -> EngineUnavailable:
        status = self._sup.status
        what = {"RESTARTING": "is restarting after its workers failed",
                "FAILED": "has failed and is not being restarted",
                "UNLOADING": "is being unloaded"}.get(status.state.value, "is not ready")
        why = f" ({status.reason})" if status.reason else ""
        return EngineUnavailable(f"model `{self.name}` {what}{why}; retry later")


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _resolver(done: asyncio.Future) -> Callable[[], None]:
    return lambda: done.done() or done.set_result(None)


def _call_all(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        call()
