"""The executor's failure protocol, with ranks played by threads over real pipes: an
exception on the workers fails the call only (every rank still answers a ping), a rank that
died or hangs fails the group, and every wait has a deadline."""

import os
import threading
import time
import weakref
from multiprocessing.connection import Connection

import numpy as np
import pytest

from shardserve.runtime.executor import Executor, RemoteError, WorkerError
from shardserve.runtime.messages import Call, Error, Reply, StepInput, StepOutput, decode, encode


class FakeProc:
    def __init__(self):
        self.pid, self.returncode = 0, None

    def poll(self):
        return self.returncode

    def kill(self):
        self.returncode = -9

    def wait(self, timeout=None):
        return self.returncode


class FakeRank:
    """A rank served by a thread: ``on_step(rank)`` returns what it sends for a step (None:
    nothing; "hang": it never answers again)."""

    def __init__(self, rank, on_step):
        self.rank, self.name, self.proc = rank, f"worker rank {rank}", FakeProc()
        a_in, a_out = os.pipe()
        b_in, b_out = os.pipe()
        self.conn_out, self.conn_in = Connection(a_out, readable=False), \
            Connection(b_in, writable=False)
        self._in, self._out = Connection(a_in, writable=False), Connection(b_out, readable=False)
        self.hung = False
        threading.Thread(target=self._serve, args=(on_step,), daemon=True).start()

    def _serve(self, on_step):
        while not self.hung:
            try:
                msg = decode(self._in.recv_bytes())
            except (EOFError, OSError):
                return
            reply = Reply(self.rank) if isinstance(msg, Call) else on_step(self.rank)  # ping
            if reply == "hang":
                self.hung = True
            elif reply is not None:
                self._out.send_bytes(encode(reply))

    def send(self, msg):
        self.send_encoded(encode(msg))

    def send_encoded(self, data):
        self.conn_out.send_bytes(data)

    def recv(self):
        return decode(self.conn_in.recv_bytes())


def _executor(on_step, size=2, step_timeout_s=1.0, tp=None):
    ex = object.__new__(Executor)
    ex.workers = [FakeRank(r, on_step) for r in range(size)]
    ex.step_timeout_s, ex.grace_s, ex._lock = step_timeout_s, 0.3, threading.Lock()
    ex.tp = tp or size
    ex.pp = size // ex.tp
    ex.driver = (ex.pp - 1) * ex.tp
    ex._start_counting()
    ex._cleanups = []
    ex._finalizer = weakref.finalize(ex, lambda: None)
    return ex


OK = StepOutput(["a"], np.array([5]))


def test_a_normal_step():
    ex = _executor(lambda r: OK if r == 0 else None)
    assert ex.execute_step(StepInput()).token_ids.tolist() == [5]


@pytest.mark.parametrize("failing", [0, 1])
def test_an_exception_on_a_rank_fails_the_step_not_the_group(failing):
    def on_step(r):
        if r == failing:
            return Error("RuntimeError: bad batch", "Traceback ...")
        time.sleep(0.05)  # the failure is seen first; rank 0 still answers
        return OK if r == 0 else None

    ex = _executor(on_step)
    with pytest.raises(RemoteError, match="rank .*RuntimeError: bad batch") as e:
        ex.execute_step(StepInput())
    assert "Traceback" not in str(e.value)
    assert ex.alive  # the group goes on
    if failing == 0:
        return
    late = _executor(lambda r: time.sleep(0.05) or Error("RuntimeError: after the answer")
                     if r == 1 else OK)
    late.execute_step(StepInput())
    time.sleep(0.1)
    with pytest.raises(WorkerError, match="after its step was answered"):
        late.execute_step(StepInput())  # rank 1's state may differ now: the group is done


def test_a_rank_stuck_after_its_peer_failed_fails_the_group():
    def on_step(r):
        return Error("RuntimeError: before the all-reduce") if r == 1 else "hang"

    ex = _executor(on_step)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="before the all-reduce.*stuck in a collective"):
        ex.execute_step(StepInput())
    assert time.monotonic() - t0 < 1.5 and not ex.alive


def test_a_hung_step_is_detected_at_its_deadline():
    ex = _executor(lambda r: "hang", step_timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="did not finish a step within"):
        ex.execute_step(StepInput())
    assert 0.3 <= time.monotonic() - t0 < 1.5 and not ex.alive
    with pytest.raises(WorkerError, match="stopped after a failure"):
        ex.execute_step(StepInput())


def test_health_checks_find_dead_and_hung_ranks():
    ex = _executor(lambda r: None)
    ex.check_health(0.3)
    ex.workers[1].proc.returncode = -9
    with pytest.raises(WorkerError, match="rank 1 died"):
        ex.check_health(0.3)
    hung = _executor(lambda r: "hang")
    hung.workers[0].hung = True  # stops reading
    hung.workers[0].send(StepInput())
    with pytest.raises(WorkerError, match="health check in time"):
        hung.check_health(0.2)


def test_pipelined_steps_are_answered_in_order_by_the_last_stage():
    """pp=2, tp=1: rank 1 (the last stage) answers; two steps in flight come back in the
    order they went out, and no health check runs between them."""
    answers = iter(range(100))

    def on_step(r):
        return StepOutput(["a"], np.array([next(answers)])) if r == 1 else None

    ex = _executor(on_step, tp=1)
    ex.submit_step(StepInput())
    ex.submit_step(StepInput())
    assert ex.steps_in_flight == 2
    ex.check_health(0.3)  # skipped: a ping now would be answered after the steps
    with pytest.raises(RuntimeError, match="in flight"):
        ex.collective_rpc("stats")
    assert [ex.next_output().token_ids[0] for _ in range(2)] == [0, 1]
    ex.check_health(0.3)


def test_a_failed_first_stage_is_the_error_reported_and_the_group_goes_on():
    """Stage 0 raises and tells stage 1, which raises StageFailed: the step fails with
    stage 0's own error, and the next step runs."""
    state = {"fail": True}

    def on_step(r):
        if state["fail"]:
            if r == 0:
                return Error("RuntimeError: bad batch on stage 0")
            time.sleep(0.05)
            return Error("StageFailed: the previous pipeline stage failed this step")
        return OK if r == 1 else None

    ex = _executor(on_step, tp=1)
    with pytest.raises(RemoteError, match="rank 0: RuntimeError: bad batch on stage 0"):
        ex.execute_step(StepInput())
    assert ex.alive
    state["fail"] = False
    assert ex.execute_step(StepInput()).token_ids.tolist() == [5]


def test_a_driver_call_waits_for_the_driver_alone_and_fails_like_a_step():
    """Only the driver answers a driver call; a peer's exception fails that call (named by its
    method), the group goes on, and the next call is answered."""
    state = {"fail": False}

    def on_step(r):
        if r == 1:
            return Error("ValueError: bad ids") if state["fail"] else None
        time.sleep(0.05)
        return Reply([0.5])

    ex = _executor(on_step)
    assert ex.driver_call("recommend", dense=np.zeros(2)) == [0.5]
    state["fail"] = True
    with pytest.raises(RemoteError, match="recommend failed on rank 1: ValueError: bad ids"):
        ex.driver_call("recommend")
    assert ex.alive
    state["fail"] = False
    assert ex.driver_call("recommend") == [0.5]
    hung = _executor(lambda r: "hang", step_timeout_s=0.2)
    with pytest.raises(WorkerError, match="did not finish recommend within"):
        hung.driver_call("recommend")
