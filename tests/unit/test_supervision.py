"""Supervision and the engine core's loop with fake engines: a failed group ends every
in-flight request at once and is replaced; a crash loop stops; every request gets exactly one
ending, through failures, restarts and unloads. The core runs on a thread over real pipes and
the real message codec (``ThreadCore``), the API side is the real ``AsyncLLMEngine``."""

import asyncio
import os
import threading
import time
from multiprocessing.connection import Connection
from types import SimpleNamespace

import pytest

from shardserve import SamplingParams
from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.engine.core import serve
from shardserve.engine.core_messages import RequestDelta, SeqDelta
from shardserve.engine.errors import EngineUnavailable, InvalidRequest
from shardserve.engine.supervisor import RestartPolicy, State, Supervisor
from shardserve.runtime.executor import WorkerError
from shardserve.runtime.process import Pipes

FAST = RestartPolicy(max_restarts=2, backoff_s=0.01, health_check_s=0.02, stable_s=60)


class FakeEngine:
    """Generates one token per request per step (token = step count); ``die`` makes the next
    step or health check raise ``WorkerError``."""

    def __init__(self, step_s=0.005):
        self.reqs, self.die, self.step_s, self.stream = {}, False, step_s, False
        self.killed = self.stopped = False
        self.blocks = SimpleNamespace(num_blocks=8, num_free=8)
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.aborts = []

    def add_request(self, rid, tokens, params, prompt=None, salt=None, features=None):
        if not tokens:
            raise InvalidRequest("prompt is empty", "prompt")
        self.reqs[rid] = (params.max_tokens, [])

    def has_unfinished(self):
        return bool(self.reqs)

    def step(self):
        time.sleep(self.step_s)
        if self.die:
            raise WorkerError("worker rank 1 died (exit code -9)")
        outs = []
        for rid, (limit, toks) in list(self.reqs.items()):
            toks.append(len(toks))
            done = len(toks) >= limit
            if done:
                del self.reqs[rid]
            outs.append(_delta(rid, [toks[-1]], done))
        return outs

    def abort_request(self, rid):
        self.aborts.append(rid)
        req = self.reqs.pop(rid, None)
        return None if req is None else _delta(rid, [], True, "abort")

    def check_health(self, timeout_s):
        if self.die:
            raise WorkerError("worker rank 0 did not answer a health check in time: it is hung")

    def shutdown(self, kill=False):
        self.killed, self.stopped = kill, True


def _delta(rid, new, done, reason="length"):
    return RequestDelta(rid, [SeqDelta(0, new, None, reason if done else None)], done)


class ThreadCore:
    """An engine core on a thread (``engine/core.serve``) with the pipe surface of a core
    process; ``kill`` closes the API side's pipe, which stops the core at its next read."""

    pid = 0

    def __init__(self, build, health_check_s=0.02):
        core_in, api_out = os.pipe()
        api_in, core_out = os.pipe()
        self.api = Pipes(Connection(api_in, writable=False), Connection(api_out, readable=False))
        core = Pipes(Connection(core_in, writable=False), Connection(core_out, readable=False))

        def run():
            try:
                serve(core, build, health_check_s, 1.0)
            finally:  # its reading end stays open: the core's inbox thread may still be
                core.conn_out.close()  # reading it (it sees EOF when the API side closes)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def send(self, msg):
        self.api.send(msg)

    def recv(self):
        return self.api.recv()

    def exit_code(self, wait_s=0.0):
        self.thread.join(wait_s)
        return None if self.thread.is_alive() else 0

    def kill(self):
        self.api.conn_out.close()

    def reap(self, timeout_s=10.0):
        if not self.api.conn_out.closed:
            self.api.conn_out.close()
        self.thread.join(timeout_s)


class Factory:
    def __init__(self, fail_after=None):
        self.built, self.fail_after = [], fail_after

    def __call__(self):
        if self.fail_after is not None and len(self.built) >= self.fail_after:
            raise ValueError("model.safetensors: file is truncated")
        self.built.append(FakeEngine())
        return self.built[-1]


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_failed_group_is_replaced_and_a_stale_report_is_ignored():
    factory = Factory()
    sup = Supervisor("m", factory, FAST)
    first = sup.start()
    sup.fail(first, WorkerError("worker rank 1 died"))
    assert first.killed and sup.engine is None
    _wait_for(lambda: sup.state is State.READY)
    assert sup.engine is factory.built[1] and sup.status.restarts == 1
    assert "rank 1 died" in sup.status.reason
    sup.fail(first, WorkerError("late report of the old group"))  # ignored
    assert sup.engine is factory.built[1]
    sup.close()
    assert factory.built[1].stopped and not factory.built[1].killed  # a polite stop


def test_a_crash_loop_gives_up_and_says_why():
    factory = Factory(fail_after=1)
    sup = Supervisor("m", factory, FAST)
    sup.fail(sup.start(), WorkerError("worker rank 0 died"))
    _wait_for(lambda: sup.state is State.FAILED)
    assert "gave up after 2" in sup.status.reason and "truncated" in sup.status.reason
    time.sleep(0.1)
    assert len(factory.built) == 1  # no more tries
    sup.close()


def test_the_health_check_finds_a_hung_idle_group():
    factory = Factory()
    sup = Supervisor("m", factory, FAST)
    sup.start().die = True
    _wait_for(lambda: sup.status.restarts == 1 and sup.state is State.READY)
    assert "hung" in sup.status.reason
    sup.close()


def _engine(factory=None):
    factory = factory or Factory()
    return AsyncLLMEngine(lambda: ThreadCore(factory), "m", FAST, answer_timeout_s=1.0)


async def _collect(engine, rid, max_tokens=5, tokens=(1,)):
    outs = []
    try:
        async for out in engine.generate(list(tokens), SamplingParams(max_tokens=max_tokens),
                                         rid):
            outs.append(out)
    except Exception as e:
        return outs, e
    return outs, None


def test_a_dead_group_ends_every_stream_at_once_and_the_next_group_serves():
    factory = Factory()
    engine = _engine(factory)

    async def main():
        tasks = [asyncio.create_task(_collect(engine, f"r{i}", max_tokens=10**6))
                 for i in range(3)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        factory.built[0].die = True
        results = await asyncio.gather(*tasks)
        assert time.monotonic() - t0 < 2
        for outs, error in results:
            assert outs and isinstance(error, EngineUnavailable) and "restarting" in str(error)
        _wait_for(lambda: engine.status.state is State.READY)
        outs, error = await _collect(engine, "after")
        assert error is None and outs[-1].finished

    asyncio.run(main())
    engine.shutdown(0)


def test_bad_input_and_unload_give_each_request_one_ending():
    factory = Factory()
    engine = _engine(factory)
    factory.built[0].step_s = 0.02

    async def main():
        outs, error = await _collect(engine, "empty", tokens=())
        assert isinstance(error, InvalidRequest)
        quick = asyncio.create_task(_collect(engine, "quick", max_tokens=3))
        slow = asyncio.create_task(_collect(engine, "slow", max_tokens=10**6))
        await asyncio.sleep(0.05)
        closer = threading.Thread(target=engine.shutdown, args=(0.3,))
        closer.start()
        await asyncio.sleep(0.02)
        late = await _collect(engine, "late")
        (q_outs, q_err), (s_outs, s_err) = await asyncio.gather(quick, slow)
        closer.join()
        assert q_err is None and q_outs[-1].finished  # finished within the drain
        assert isinstance(s_err, EngineUnavailable) and "unloaded" in str(s_err)
        assert isinstance(late[1], EngineUnavailable)
        after = await _collect(engine, "after-close")
        assert isinstance(after[1], EngineUnavailable)
        await engine.abort("anything")  # answers, does not hang

    asyncio.run(main())
    assert factory.built[0].stopped


def test_an_exception_in_the_abort_path_does_not_stop_the_loop():
    factory = Factory()
    engine = _engine(factory)

    def broken_abort(rid):
        raise RuntimeError("bug in abort")

    async def main():
        factory.built[0].abort_request = broken_abort
        gen = engine.generate([1], SamplingParams(max_tokens=10**6), "x")
        await anext(gen)
        await gen.aclose()  # the abort raises on the loop thread: the group is replaced
        _wait_for(lambda: engine.status.restarts == 1 and engine.status.state is State.READY)
        outs, error = await _collect(engine, "y")
        assert error is None and outs[-1].finished

    asyncio.run(main())
    engine.shutdown(0)


def test_a_first_start_that_fails_raises():
    with pytest.raises(ValueError, match="truncated"):
        _engine(Factory(fail_after=0))


class StuckCore:
    """A core that never finishes loading (a Ray cluster with no room for its placement
    groups) until it is killed."""

    pid = 0

    def __init__(self):
        self.killed = threading.Event()

    def send(self, msg):
        pass

    def recv(self):
        self.killed.wait()
        raise EOFError

    def exit_code(self, wait_s=0.0):
        return -9 if self.killed.is_set() else None

    def kill(self):
        self.killed.set()

    def reap(self, timeout_s=10.0):
        pass


def test_unloading_while_a_restart_waits_for_room_does_not_hang():
    factory, cores = Factory(), []

    def launch():
        cores.append(ThreadCore(factory) if not cores else StuckCore())
        return cores[-1]

    engine = AsyncLLMEngine(launch, "m", FAST, answer_timeout_s=1.0)
    factory.built[0].die = True  # the group fails; the restart's core never loads
    _wait_for(lambda: len(cores) == 2)
    t0 = time.monotonic()
    engine.shutdown(0)
    assert time.monotonic() - t0 < 2 and cores[1].killed.is_set()
