"""asyncio front of the engine: streaming outputs and cancellation.

The engine is not thread-safe and its steps block, so it runs on one thread of its own: it
takes commands (add, abort, stop) from a queue between steps and hands each request's outputs
to that request's asyncio queue. Every engine call happens on that thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shardserve.engine.errors import EngineUnavailable
from shardserve.engine.llm_engine import LLMEngine
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        engine.stream = True
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it; the last
        one has ``finished`` set. Leaving the iteration early aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", request_id, prompt_token_ids, params, prompt, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller went away: free its blocks
                self._commands.put(("abort", request_id, None))

    async def abort(self, request_id: str) -> None:
        """Abort a request; when this returns its blocks are free."""
        done = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("abort", request_id, done))
        await done.queue.get()

    def shutdown(self) -> None:
        """Refuse new requests, let the running ones finish, then stop the workers."""
        self._commands.put(("stop",))
        self._thread.join()
        self.engine.shutdown()

    # -- the loop thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not (self._stopping and not self.engine.has_unfinished()):
            self._drain(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # the group is gone: fail everyone, accept no more
                self._fail(e)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]

    def _drain(self, block: bool) -> None:
        """Apply queued commands, waiting for one if ``block``."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if cmd[0] == "stop":
                self._stopping = True
            elif cmd[0] == "add":
                self._add(*cmd[1:])
            else:
                self._abort(*cmd[1:])

    def _add(self, request_id, tokens, params, prompt, stream: _Stream) -> None:
        try:
            if self._error is not None:
                raise EngineUnavailable(f"the model's workers failed: {self._error}")
            if self._stopping:
                raise EngineUnavailable("the model is being unloaded")
            self.engine.add_request(request_id, tokens, params, prompt)
        except Exception as e:
            stream.put(e)
            return
        self._streams[request_id] = stream

    def _abort(self, request_id: str, done: _Stream | None) -> None:
        out = self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None and out is not None:
            stream.put(out)
        if done is not None:
            done.put(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self.engine.requests.pop(request_id, None)
        self._streams.clear()
        self.engine.scheduler.waiting.clear()
        self.engine.scheduler.running.clear()
