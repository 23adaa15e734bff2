"""asyncio front of the engine: streaming outputs, cancellation, and a supervised engine.

The engine is not thread-safe and its steps block, so it runs on one thread of its own: it
takes commands (add, abort, stop) from a queue between steps and hands each request's outputs
to that request's asyncio queue. Every engine call happens on that thread.

Every request gets exactly one ending: its last output, or an exception put on its queue
(``InvalidRequest`` at admission, ``RequestFailed`` when it failed alone, ``EngineUnavailable``
when the group failed or the model is being unloaded). When the group fails (a ``WorkerError``
from a step, or the supervisor's health check) every in-flight request ends with
``EngineUnavailable`` at once and the supervisor starts a new group; requests that arrive
meanwhile are refused the same way. Once stopped, ``generate`` refuses at once: nothing is
queued to a loop that will not read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from shardserve.engine.errors import EngineUnavailable, InvalidRequest, RequestFailed
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.supervisor import RestartPolicy, Status, Supervisor
from shardserve.outputs import RequestOutput
from shardserve.runtime.executor import WorkerError
from shardserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5  # how often an idle loop looks for a replaced engine


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class Load:
    """What the loop last saw, for metrics (read from any thread without touching the
    engine)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


class AsyncLLMEngine:
    def __init__(self, factory: Callable[[], LLMEngine], name: str = "llm",
                 policy: RestartPolicy | None = None) -> None:
        """``factory`` builds the engine (and again after a failure); the first build's error
        is raised here."""
        self.name = name
        self._sup = Supervisor(name, factory, policy or RestartPolicy())
        self._engine: LLMEngine | None = self._sup.start()
        self._engine.stream = True
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # orders "closed" against commands put in the queue
        self._closed = False
        self._drain_until: float | None = None  # set by stop: finish by then, abort after
        self.load = Load()
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def status(self) -> Status:
        return self._sup.status

    @property
    def engine(self) -> LLMEngine | None:
        """The engine now (None while restarting): owned by the loop thread, for inspection
        only."""
        return self._engine

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, prompt: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it; the last
        one has ``finished`` set. Raises ``InvalidRequest``, ``RequestFailed`` or
        ``EngineUnavailable``. Leaving the iteration early aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._put(("add", request_id, prompt_token_ids, params, prompt, cache_salt, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailed(item.error)
                yield item
        finally:
            if not finished:  # the caller went away: free its blocks
                self._put(("abort", request_id, None), quiet=True)

    async def abort(self, request_id: str) -> None:
        """Abort a request; when this returns its blocks are free."""
        done = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if self._put(("abort", request_id, done), quiet=True):
            await done.queue.get()

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let the running ones finish for up to ``drain_timeout_s``
        (then abort them), then stop the workers."""
        self._put(("stop", time.monotonic() + drain_timeout_s), quiet=True)
        self._thread.join()

    def _put(self, cmd: tuple, quiet: bool = False) -> bool:
        with self._lock:
            if not self._closed:
                self._commands.put(cmd)
                return True
        if not quiet:
            raise EngineUnavailable(f"model `{self.name}` was unloaded")
        return False

    # -- the loop thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not (self._drain_until is not None and not self._busy()):
                try:
                    self._sync_engine()
                    self._drain(block=not self._busy())
                    if self._drain_until is not None and time.monotonic() > self._drain_until:
                        self._end_all(EngineUnavailable(
                            f"model `{self.name}` was unloaded before the request finished"))
                    if self._busy():
                        self._deliver(self._engine.step())
                    self._measure()
                except Exception as e:  # the group failed (or the loop has a bug)
                    self._lost(e)
        finally:
            self._close()

    def _busy(self) -> bool:
        return self._engine is not None and self._engine.has_unfinished()

    def _sync_engine(self) -> None:
        """Pick up the engine the supervisor holds now (None while restarting)."""
        engine = self._sup.engine
        if engine is not self._engine:
            if self._engine is not None:  # replaced behind our back: the old group is gone
                self._end_all(self._unavailable())
            self._engine = engine
            if engine is not None:
                engine.stream = True

    def _drain(self, block: bool) -> None:
        """Apply queued commands, waiting a little for one if ``block``."""
        while True:
            try:
                cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block \
                    else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if cmd[0] == "stop":
                self._drain_until = cmd[1]
            elif cmd[0] == "add":
                self._add(*cmd[1:])
            else:
                self._abort(*cmd[1:])

    def _add(self, request_id, tokens, params, prompt, salt, stream: _Stream) -> None:
        try:
            if self._drain_until is not None:
                raise EngineUnavailable(f"model `{self.name}` is being unloaded")
            self._sync_engine()
            if self._engine is None:
                raise self._unavailable()
            self._engine.add_request(request_id, tokens, params, prompt, salt)
        except (InvalidRequest, EngineUnavailable) as e:
            stream.put(e)
            return
        except Exception as e:  # a bug in admission: this request's, not the group's
            log.exception("%s: adding request %s failed", self.name, request_id)
            stream.put(RequestFailed(f"internal error while admitting it "
                                     f"({type(e).__name__})"))
            return
        self._streams[request_id] = stream

    def _abort(self, request_id: str, done: _Stream | None) -> None:
        try:
            out = None if self._engine is None else self._engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)  # (kept if the abort raised)
            if stream is not None:
                stream.put(out if out is not None else RequestFailed("the request was aborted"))
        finally:
            if done is not None:
                done.put(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
                if out.finished:
                    del self._streams[out.request_id]

    def _measure(self) -> None:
        e = self._engine
        if e is None:
            self.load = Load()
            return
        used = e.blocks.num_blocks - e.blocks.num_free
        self.load = Load(len(e.scheduler.running), len(e.scheduler.waiting),
                         used / e.blocks.num_blocks)

    def _lost(self, error: Exception) -> None:
        """The group (or this loop) failed: end every request now, let the supervisor
        restart it."""
        if not isinstance(error, WorkerError):
            log.exception("%s: the engine loop failed; restarting the group", self.name)
        engine, self._engine = self._engine, None
        self._sup.fail(engine, error)
        self._end_all(self._unavailable())

    def _unavailable(self) -> EngineUnavailable:
        status = self._sup.status
        what = {"RESTARTING": "is restarting after its workers failed",
                "FAILED": "has failed and is not being restarted",
                "UNLOADING": "is being unloaded"}.get(status.state.value, "is not ready")
        why = f" ({status.reason})" if status.reason else ""
        return EngineUnavailable(f"model `{self.name}` {what}{why}; retry later")

    def _end_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            if self._engine is not None:
                self._engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()

    def _close(self) -> None:
        """After the loop: refuse what is still queued, end what is still open, stop the
        workers."""
        with self._lock:
            self._closed = True
        gone = EngineUnavailable(f"model `{self.name}` was unloaded")
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[-1].put(gone)
            elif cmd[0] == "abort" and cmd[2] is not None:
                cmd[2].put(None)
        try:
            self._end_all(gone)
        except Exception:
            log.exception("%s: ending requests at unload failed", self.name)
            for stream in self._streams.values():
                stream.put(gone)
        self._engine = None
        self._sup.close()
        self.load = Load()
