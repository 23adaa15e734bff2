"""Dynamic batching with Triton's semantics, for models that answer one forward pass per batch.

Note on the algorithm: requests queue with their arrival time. A batch is cut when the queue
holds ``max_batch_size`` requests, or a preferred batch size while waiting longer would not
help, or when the oldest request has waited ``max_queue_delay_ms``. The oldest request is
always in the batch (no starvation); the rest of the batch is filled with the queued requests
nearest to it in length, so rows padded to the longest waste little. One batch runs at a time
(the model's workers are one group); requests past their timeout before being batched fail
with ``TimeoutError``. ``batches`` and ``items`` count what ran, so tests can see sharing.

A batch that raises is run again one request at a time, so a request that cannot run fails
alone and its batch-mates get their rows (unless the model is unavailable: then all fail at
once). ``close`` refuses new requests, lets the queued and running batches finish until a
deadline, and fails what is left; it may be called from any thread but the loop's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardserve.engine.errors import EngineUnavailable


@dataclass
class _Pending:
    item: Any
    size: int  # its length, for padding-aware grouping
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    deadline: float | None = None


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int,
                 max_queue_delay_ms: float = 0.0, preferred_batch_sizes: Sequence[int] = (),
                 timeout_s: float | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if any(not 1 <= p <= max_batch_size for p in preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes {list(preferred_batch_sizes)} must lie "
                             f"in 1..max_batch_size ({max_batch_size})")
        self.run_batch, self.max_batch_size = run_batch, max_batch_size
        self.delay = max_queue_delay_ms / 1000
        self.preferred = sorted(set(preferred_batch_sizes))
        self.timeout_s = timeout_s
        self.queue: list[_Pending] = []
        self.batches = 0
        self.items = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._running: list[_Pending] = []  # the batch on the model now

    async def submit(self, item: Any, size: int = 1) -> Any:
        """Queue ``item`` and wait for its result (its row of the batch's results)."""
        if self._closing:
            raise EngineUnavailable("the model is being unloaded")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake, self._loop_ref = asyncio.Event(), loop
            self._task = loop.create_task(self._loop())
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        pending = _Pending(item, size, loop.create_future(), deadline=deadline)
        self.queue.append(pending)
        self._wake.set()
        return await pending.future

    def close(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests; let the queued ones run for up to ``drain_timeout_s``, then
        fail the rest with ``EngineUnavailable``. Returns when every request has its answer."""
        self._closing = True
        loop = self._loop_ref
        if loop is None or loop.is_closed() or not loop.is_running():
            self._fail_queued()  # no loop runs the batches: nobody else will answer them
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            raise RuntimeError("DynamicBatcher.close blocks: call it from another thread")
        asyncio.run_coroutine_threadsafe(self._drain(drain_timeout_s), loop).result()

    async def _drain(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle(), timeout_s)
        if self._task is not None:
            self._task.cancel()
        self._fail_queued()

    async def _idle(self) -> None:
        while self.queue or self._running:
            await asyncio.sleep(0.01)

    def _fail_queued(self) -> None:
        for p in self.queue + self._running:
            if not p.future.done():
                p.future.set_exception(EngineUnavailable("the model was unloaded before the "
                                                         "request ran"))
        self.queue.clear()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                await self._wait_for_batch()
                batch = self._cut()
                if batch:
                    self._running = batch
                    try:
                        await self._run(batch)
                    finally:
                        self._running = []

    async def _wait_for_batch(self) -> None:
        """Until the batch is full, a preferred size is reached, or the oldest has waited
        long enough."""
        while len(self.queue) < self.max_batch_size:
            if self.preferred and len(self.queue) in self.preferred \
                    and len(self.queue) >= self.preferred[-1]:
                return
            left = self.queue[0].arrived + self.delay - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _cut(self) -> list[_Pending]:
        now = time.monotonic()
        self.queue = [p for p in self.queue if not p.future.done()]  # caller gone: skip it
        for p in [p for p in self.queue if p.deadline is not None and p.deadline < now]:
            self.queue.remove(p)
            p.future.set_exception(TimeoutError("the request timed out in the batch queue"))
        if not self.queue:
            return []
        oldest, rest = self.queue[0], self.queue[1:]
        rest.sort(key=lambda p: abs(p.size - oldest.size))
        batch = [oldest] + rest[:self.max_batch_size - 1]
        chosen = {id(p) for p in batch}
        self.queue = [p for p in self.queue if id(p) not in chosen]
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            results = await asyncio.to_thread(self.run_batch, [p.item for p in batch])
        except EngineUnavailable as e:
            _settle(batch, error=e)
            return
        except Exception as e:
            if len(batch) == 1:
                _settle(batch, error=e)
                return
            for p in batch:  # find the request at fault: each alone
                await self._run([p])
            return
        self.batches += 1
        self.items += len(batch)
        _settle(batch, results)


def _settle(batch: list[_Pending], results: Sequence[Any] = (),
            error: BaseException | None = None) -> None:
    if error is None and len(results) != len(batch):
        error = RuntimeError(f"the model returned {len(results)} rows for {len(batch)} inputs")
    for i, p in enumerate(batch):
        if not p.future.done():
            if error is None:
                p.future.set_result(results[i])
            else:
                p.future.set_exception(error)
