"""Admission: the one way a request of any route (OpenAI, KServe v2, a pipeline's step) gets
to a model. It checks the request against the model (``engine/validation.py``), counts it
against the model's queue (429 past it), picks a ready replica (503 while none is), and
holds the request to one deadline from admission to its last output (504), to the client's
connection (a client that goes away aborts its request), and to exactly one ending.

Engine exceptions become HTTP errors here (``http_error``): 400 for a request refused, 503
with Retry-After for a model that is restarting or unloading, 500 for a request that failed
alone, 504 past the deadline. Messages are one line; tracebacks stay in the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request

from shardserve.api.auth import Principal
from shardserve.api.errors import APIError
from shardserve.api.metrics import RequestTimer
from shardserve.engine.errors import EngineUnavailable, InvalidRequest, RequestFailed
from shardserve.engine.request_state import OutputKind
from shardserve.engine.validation import check_generation, check_inputs, check_request
from shardserve.outputs import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


def http_error(e: BaseException) -> APIError:
    """The HTTP error a client sees for an exception on a request's path."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e), e.param, "invalid_request")
    if isinstance(e, EngineUnavailable):
        return APIError(503, str(e), None, "unavailable", headers={"Retry-After": "1"})
    if isinstance(e, RequestFailed):
        return APIError(500, f"the request failed: {e}", None, "request_failed")
    if isinstance(e, ClientGone):  # nobody reads this answer
        return APIError(499, "the client closed the connection", None, "client_closed")
    if isinstance(e, TimeoutError):
        return APIError(504, "the request ran past its deadline and was stopped", None,
                        "timeout")
    log.error("unexpected error on a request's path", exc_info=e)
    return APIError(500, f"internal error ({type(e).__name__}); see the server log", None,
                    "internal_error")


async def in_pool(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (tokenizing, chat templates) on the server's small bounded pool, off the
    event loop."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.pool, fn, *args)


class Ticket:
    """One admitted request counted against its replica; ``release`` is idempotent."""

    def __init__(self, replica) -> None:
        self.replica = replica
        replica.inflight += 1

    def release(self) -> None:
        if self.replica is not None:
            self.replica.inflight -= 1
            self.replica = None


class Generation:
    """An admitted generation: iterate it once for its outputs (the last has ``finished``);
    ``aclose`` (idempotent) aborts it if unfinished and releases its admission."""

    def __init__(self, outputs: AsyncIterator[RequestOutput], ticket: Ticket,
                 deadline: float, timer: RequestTimer) -> None:
        self._outputs, self._ticket = outputs, ticket
        self.deadline, self._timer = deadline, timer
        self._first: RequestOutput | None = None

    async def first(self) -> None:
        """Wait for the first output (the request is queued until then)."""
        self._first = await within(anext(self._outputs), self.deadline)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        out = self._first
        yield out
        while not out.finished:
            out = await within(anext(self._outputs), self.deadline)
            yield out

    async def aclose(self) -> None:
        self._ticket.release()
        await self._outputs.aclose()


async def within(awaitable: Awaitable[T], deadline: float) -> T:
    """``awaitable``'s result, or ``TimeoutError`` at ``deadline`` (monotonic).

    Awaited in the caller's task under ``asyncio.timeout``, not ``asyncio.wait_for``: on
    Python 3.11 ``wait_for`` runs it in a task of its own and, when that task finishes just
    as the caller is cancelled, returns the result and drops the cancellation. A client that
    left at that moment had its generation run to the end instead of being aborted."""
    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
        return await awaitable


async def start_generation(request: Request, dep, ids: list[int], params, request_id: str,
                           prompt: str | None, who: Principal, param: str = "prompt",
                           stream: bool = False, features=None) -> Generation:
    """Admit a generation and wait for its first output; refusals raise ``APIError``. With
    ``stream`` the outputs are deltas (new tokens and text only); without, there is one
    output, the final one."""
    limits, name = request.app.state.limits, dep.config.name
    if params.n > limits.max_n:
        raise APIError(400, f"n may be at most {limits.max_n}", "n", "invalid_value")
    try:
        check_generation(ids, params, dep.model.spec.vocab_size, dep.model.context_len,
                         dep.tokenizer is not None, param)
        replica = dep.pick()
    except Exception as e:
        raise http_error(e) from None
    if dep.inflight >= limits.max_queue + len(dep.replicas) * dep.config.max_num_seqs:
        raise _queue_full(name)
    ticket = Ticket(replica)
    timer = RequestTimer(request.app.state.metrics, name, len(ids))
    timer.metrics.replica_requests.labels(name, str(dep.replicas.index(replica))).inc()
    kind = OutputKind.DELTA if stream else OutputKind.FINAL
    gen = Generation(replica.engine.generate(ids, params, request_id, prompt, who.tenant, kind,
                                             timer.observe, features),
                     ticket, time.monotonic() + limits.request_timeout_s, timer)
    try:
        await until_disconnected(request, gen.first())
    except BaseException as e:
        await gen.aclose()
        if isinstance(e, Exception):
            raise http_error(e) from None
        raise
    return gen


async def finish(request: Request, gen: Generation,
                 each: Callable[[RequestOutput], None] | None = None) -> RequestOutput:
    """A request's last output (``each`` sees every output first: the deltas of a streaming
    one); aborted if the client goes away."""
    async def last() -> RequestOutput:
        final = None
        async for out in gen:
            if each is not None:
                each(out)
            final = out
        return final

    try:
        return await until_disconnected(request, last())
    except Exception as e:
        raise http_error(e) from None
    finally:
        await gen.aclose()


async def embed(request: Request, dep, inputs: list[list[int]], truncate: bool,
                param: str = "input") -> list:
    """Each input through a ready replica's dynamic batcher; rows back in order."""
    try:
        ids = check_inputs(inputs, dep.model.spec.vocab_size, dep.model.context_len, truncate,
                           param)
    except Exception as e:
        raise http_error(e) from None
    return await batched(request, dep, ids, [len(t) for t in ids])


async def score(request: Request, dep, dense, values, lengths) -> Any:
    """A recommender's scores for one request, checked before it queues (a bad one never
    shares a batch), through a ready replica's dynamic batcher."""
    try:
        checked = check_request(dep.model.spec, dense, values, lengths)
    except Exception as e:
        raise http_error(e) from None
    return (await batched(request, dep, [checked], [len(checked[0])]))[0]


async def batched(request: Request, dep, items: list, sizes: list[int]) -> list:
    """Each item through a ready replica's dynamic batcher (an encoder's or a
    recommender's), within the queue bound and the request's deadline; results in order."""
    limits = request.app.state.limits
    try:
        replica = dep.pick()
    except Exception as e:
        raise http_error(e) from None
    if len(replica.engine.batcher.queue) + len(items) > \
            limits.max_queue * dep.config.max_batch_size:  # items queued, not requests
        raise _queue_full(dep.config.name)
    ticket = Ticket(replica)
    deadline = time.monotonic() + limits.request_timeout_s
    try:
        rows = asyncio.gather(*(replica.engine.submit(item, size=size)
                                for item, size in zip(items, sizes, strict=True)))
        return await until_disconnected(request, within(rows, deadline))
    except Exception as e:
        raise http_error(e) from None
    finally:
        ticket.release()


def _queue_full(name: str) -> APIError:
    return APIError(429, f"model `{name}` has too many requests queued; retry shortly", None,
                    "rate_limited", headers={"Retry-After": "1"})


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result; if the client disconnects first it is cancelled (a generation
    is aborted) and ``ClientGone`` raised."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGone()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


async def _disconnect(request: Request) -> None:
    """Return when the client has gone (the body was read already: only disconnects come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
