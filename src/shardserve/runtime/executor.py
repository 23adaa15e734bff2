"""Local executor: spawns one worker process per device of a group and talks to them over
OS pipes with typed messages.

A step goes to every rank at once; rank 0 of the last pipeline stage (the driver; rank 0 at
pp=1) answers. Several steps may be in flight (``submit_step`` / ``next_output``): each rank
takes its messages in order, so while the last stage computes one micro-batch the first
computes the next, and the answers come back in the order the steps went out. Every wait has
a deadline and watches every rank's pipe, so the executor tells apart the two ways a call can
go wrong:

- ``RemoteError``: the workers raised an exception (a bad batch, a transient failure) and every
  rank still answers a ping: only this call failed, the group goes on.
- ``WorkerError``: a rank died, or did not answer within its deadline (hung, or stuck in a
  collective that a failed peer never joined). The whole group is stopped at once; whoever
  owns it starts a new one.

Workers watch their parent process and exit when it is gone, and ``shutdown`` (also run at
exit and on garbage collection) stops and reaps them: no orphans. The group meets through a
``FileStore`` in a private folder that is removed once the group has formed, so no rendezvous
socket ever listens.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from shardserve.config import ModelConfig, ParallelConfig
from shardserve.kernels import ops
from shardserve.runtime import shm
from shardserve.runtime.devices import Device
from shardserve.runtime.messages import (
    Call,
    DriverCall,
    Error,
    Reply,
    Shutdown,
    StepInput,
    StepOutput,
    WorkerInit,
    encode,
)
from shardserve.runtime.process import Child

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The group failed (a rank died or hung) and was stopped; the message says which rank and
    why, in one line."""


class RemoteError(RuntimeError):
    """The call raised on the workers, and every rank is alive and answering: the group is
    usable. The message is the exception's first line; the traceback went to the log."""


class _Worker:
    def __init__(self, rank: int, device: Device, label: str) -> None:
        self.rank, self.device = rank, device
        # a CPU worker on this machine runs the bfloat16 kernel chosen here (ops.pair_mode)
        kernels = ops.pair_mode_env() if device.kind == "cpu" else {}
        env = dict(os.environ, OMP_NUM_THREADS=str(len(device.cores) or 1),
                   GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo",
                   **kernels)
        self.child = Child("shardserve.runtime.worker", f"{label}:rank{rank}", env)
        self.proc, self.conn_in, self.conn_out = self.child.proc, self.child.conn_in, \
            self.child.conn_out

    @property
    def name(self) -> str:
        return f"worker rank {self.rank} ({self.device.name}, pid {self.proc.pid})"

    def send(self, msg: Any) -> None:
        self.send_encoded(encode(msg))

    def send_encoded(self, data: bytes) -> None:
        try:
            self.child.send_encoded(data)
        except OSError:  # broken pipe: the process is gone
            raise WorkerError(f"{self.name} died (exit code {self.proc.poll()})") from None

    def recv(self) -> Any:
        try:
            return self.child.recv()
        except (EOFError, OSError):
            raise WorkerError(f"{self.name} died (exit code {self.child.exit_code(5)})") \
                from None


class Executor:
    """The processes of one device group. ``collective_rpc`` is the one control verb.

    ``devices`` are ``tp x pp`` (``tp`` default: all of them, one stage): world rank ``r`` is
    tp rank ``r % tp`` of stage ``r // tp``. ``step_timeout_s`` bounds every step and call
    (a rank that has not answered by then is hung); ``load_timeout_s`` bounds start-up.
    Calls are serialised by a lock, so a health check from another thread never interleaves
    with a step, and none runs while steps are in flight."""

    def __init__(self, config: ModelConfig, devices: list[Device], label: str = "",
                 step_timeout_s: float = 300.0, compute_dtype: str | None = None,
                 load_timeout_s: float = 1800.0, shm_slot_bytes: int = 8 << 20,
                 kv_cache_dtype: str | None = None, tp: int | None = None,
                 pipeline_split: tuple[float, ...] | None = None) -> None:
        self._configure(config, devices, step_timeout_s, compute_dtype, shm_slot_bytes,
                        kv_cache_dtype, tp, pipeline_split)
        rendezvous = tempfile.mkdtemp(prefix="shardserve-rdv-")  # mode 0700
        shm_paths: list[str | None] = [None] * self.pp  # one exchange per stage's tp group
        if self.tp > 1 and devices[0].kind == "cpu" and shm.supported():
            shm_paths = [shm.create(self.tp, shm_slot_bytes) for _ in range(self.pp)]
        self._cleanups.extend(functools.partial(_unlink, p) for p in shm_paths)
        label = label or os.path.basename(os.path.normpath(config.path))
        try:
            self.workers.extend(_Worker(rank, d, label) for rank, d in enumerate(devices))
            self._start(lambda w: self._worker_init(
                w, os.path.join(rendezvous, "store"), shm_paths[w.rank // self.tp]),
                load_timeout_s)
        finally:
            shutil.rmtree(rendezvous, ignore_errors=True)  # the group has formed, or failed
            for path in shm_paths:  # every rank has it mapped now; nothing else may open it
                _unlink(path)

    def _configure(self, config: ModelConfig, devices: list[Device], step_timeout_s: float,
                   compute_dtype: str | None, shm_slot_bytes: int, kv_cache_dtype: str | None,
                   tp: int | None, pipeline_split: tuple[float, ...] | None) -> None:
        """What every executor knows before its workers start."""
        self.config, self.devices = config, devices
        self.tp = tp or len(devices)
        if len(devices) % self.tp:
            raise ValueError(f"{len(devices)} devices do not make stages of tp={self.tp}")
        self.pp = len(devices) // self.tp
        if self.pp > 1 and not pipeline_split:  # the workers get the split, never guess it
            pipeline_split = tuple(st.size for st in
                                   ParallelConfig(self.tp, self.pp).stages(config.spec))
        self.driver = (self.pp - 1) * self.tp  # the rank that answers steps
        self.step_timeout_s = step_timeout_s
        self.grace_s = 3.0  # how long the peers of a rank that raised get to answer
        self.compute_dtype, self.kv_cache_dtype = compute_dtype, kv_cache_dtype
        self.shm_slot_bytes, self.pipeline_split = shm_slot_bytes, pipeline_split
        self._lock = threading.Lock()
        self._start_counting()
        self.workers: list = []
        self._cleanups: list[Callable[[], None]] = []  # run once the workers are stopped
        self._finalizer = weakref.finalize(self, _stop, self.workers, self._cleanups)

    def _worker_init(self, w, store_path: str, shm_path: str | None,
                     cores: list[int] | None = None) -> WorkerInit:
        cfg, split = self.config, self.pipeline_split
        return WorkerInit(
            rank=w.rank, world_size=len(self.devices), store_path=store_path,
            device_kind=w.device.kind, device_index=w.device.index,
            cores=list(w.device.cores) if cores is None else cores,
            memory_budget=w.device.memory_budget, model_path=os.path.abspath(cfg.path),
            dtype=cfg.torch_dtype_name, compute_dtype=self.compute_dtype or cfg.torch_dtype_name,
            max_model_len=cfg.context_len, quantization=cfg.quantization, shm_path=shm_path,
            shm_slot_bytes=self.shm_slot_bytes, kv_cache_dtype=self.kv_cache_dtype, tp=self.tp,
            pipeline_split=list(split) if split else None,
            num_threads=max(1, len(w.device.cores)))

    def _start(self, init_for: Callable[[Any], WorkerInit], timeout_s: float) -> None:
        """Send each worker its ``WorkerInit``; wait until every rank has loaded."""
        try:
            for w in self.workers:
                w.send(init_for(w))
            self.load_stats = self._gather_all(timeout_s, what="loading")
        except BaseException:
            self._kill()  # others may be stuck joining the group
            raise

    def _start_counting(self) -> None:
        # the steps sent and not answered: their numbers, and what each is (for errors)
        self._inflight: deque[tuple[int, str]] = deque()
        self._sent = 0  # steps sent so far (every rank numbers them alike)
        self._step_errors: dict[int, tuple[_Worker, Error]] = {}  # from non-driver ranks
        self._ping_owed = False  # a step failed while others were in flight

    # -- calls -----------------------------------------------------------------------------
    def collective_rpc(self, method: str, **kwargs: Any) -> list[Any]:
        """Run an allowed worker method on every rank; one result per rank."""
        with self._lock:
            self._check_idle(method)
            with self._stop_on_failure():
                return self._call(method, kwargs)

    def _call(self, method: str, kwargs: dict[str, Any]) -> list[Any]:
        data = encode(Call(method, kwargs))  # once: every rank gets its copy at once
        for w in self.workers:
            w.send_encoded(data)
        return self._gather_all(self.step_timeout_s, what=method)

    def execute_step(self, step: StepInput) -> StepOutput:
        """Run one step and return its answer (nothing else may be in flight)."""
        with self._lock:
            self._check_idle("a step")
        self.submit_step(step)
        return self.next_output()

    def submit_step(self, step: StepInput) -> None:
        """Send a step to every rank without waiting for its answer."""
        self._submit(encode(step), "a step")

    def driver_call(self, method: str, **kwargs: Any) -> Any:
        """Run an allowed worker method on every rank as a step: only the driver's result comes
        back (one reply to wait for, where ``collective_rpc`` waits for every rank's), and a
        rank that fails is handled as in a step."""
        with self._lock:
            self._check_idle(method)
        self._submit(encode(DriverCall(method, kwargs)), method)
        return self.next_output().value

    def _submit(self, data: bytes, what: str) -> None:
        with self._lock, self._stop_on_failure(quiet=not self._inflight):
            for w in self.workers:  # encoded once: every rank gets the same bytes
                w.send_encoded(data)
            self._inflight.append((self._sent, what))
            self._sent += 1

    def next_output(self) -> StepOutput | Reply:
        """The answer to the oldest step in flight (a ``Reply`` to a driver call);
        ``RemoteError`` if it failed there."""
        with self._lock, self._stop_on_failure(quiet=False):
            if not self._inflight:
                raise RuntimeError("no step is in flight")
            try:
                return self._wait_step(*self._inflight.popleft())
            finally:
                if self._ping_owed and not self._inflight:
                    self._ping_owed = False
                    self._ping(self.grace_s)

    @property
    def steps_in_flight(self) -> int:
        return len(self._inflight)

    def check_health(self, timeout_s: float) -> None:
        """Raise ``WorkerError`` if a rank has died or does not answer a ping within
        ``timeout_s``; safe from any thread (skipped while a call or step runs)."""
        if not self._lock.acquire(blocking=False):
            return  # a step is running: its own deadline (and its pipes' EOF) watch it
        if self._inflight:
            self._lock.release()
            return
        try:
            with self._stop_on_failure():
                self._ping(timeout_s)
        finally:
            self._lock.release()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def shutdown(self) -> None:
        """Ask every worker to exit and reap them (killing any that does not within 10 s).
        A call still running after 10 s is cut short: its workers are killed."""
        if self._lock.acquire(timeout=10):
            try:
                self._finalizer()
            finally:
                self._lock.release()
            return
        for w in self.workers:  # the caller's wait sees EOF and raises WorkerError
            w.proc.kill()
        self._finalizer()

    def kill(self) -> None:
        """Kill every worker at once (a failed group: a hung rank would not answer)."""
        self._kill()

    def stop(self, kill: bool = False) -> None:
        """``kill`` after a failure, else ``shutdown``."""
        if kill:
            self.kill()
        else:
            self.shutdown()

    # -- waiting ---------------------------------------------------------------------------
    def _check_idle(self, what: str) -> None:
        if self._inflight:
            raise RuntimeError(f"{what} cannot run while {len(self._inflight)} steps are in "
                               "flight; take their outputs first")

    @contextlib.contextmanager
    def _stop_on_failure(self, quiet: bool = True):
        """A rank that died or hung leaves its peers mid-collective: stop them all at once.
        ``quiet``: no rank may have spoken since the last call (nothing is in flight)."""
        if not self.alive:
            raise WorkerError("this deployment's workers were stopped after a failure")
        try:
            self._check_alive()
            if quiet:
                self._check_quiet()
            yield
        except WorkerError:
            self._kill()
            raise

    def _check_alive(self) -> None:
        for w in self.workers:
            if w.proc.poll() is not None:
                raise WorkerError(f"{w.name} died (exit code {w.proc.returncode})")

    def _gather_all(self, timeout_s: float, what: str) -> list[Any]:
        """Every rank's reply. After the first ``Error``, the others get a short grace period
        (a rank still waiting on the failed one in a collective never answers)."""
        out: dict[int, Any] = {}
        errors: list[tuple[_Worker, Error]] = []
        pending = {w.conn_in: w for w in self.workers}
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                ready = wait(list(pending), max(0.0, deadline - time.monotonic()))
                if not ready:
                    late = pending[next(iter(pending))]
                    raise WorkerError(f"{late.name} did not answer {what} in time: it is hung")
                for conn in ready:
                    w = pending.pop(conn)
                    msg = w.recv()
                    if isinstance(msg, Error):
                        errors.append((w, msg))
                        deadline = min(deadline, time.monotonic() + self.grace_s)
                    out[w.rank] = msg
        except WorkerError as e:
            if errors:  # the first failure is the news; the rest followed from it
                raise WorkerError(f"{self._remote_error(errors[0], what)}; then {e}") from None
            raise
        if errors:
            raise self._remote_error(errors[0], what)
        return [out[r].value for r in range(len(self.workers))]

    def _wait_step(self, step: int, what: str) -> StepOutput | Reply:
        """The driver's answer to ``step``. Other ranks never answer a step: one that speaks
        has failed (its ``Error`` names the step). A failure on a rank that is not the driver
        gives the driver ``grace_s`` to answer too (else it is stuck in a collective with the
        failed rank); a late failure, for a step already answered, fails the group."""
        conns = {w.conn_in: w for w in self.workers}
        driver = self.workers[self.driver]
        deadline = time.monotonic() + self.step_timeout_s
        answer: StepOutput | Reply | None = None
        driver_error: tuple[_Worker, Error] | None = None
        while answer is None and driver_error is None:
            ready = wait(list(conns), max(0.0, deadline - time.monotonic()))
            if not ready:
                if step in self._step_errors:
                    remote = self._remote_error(self._step_errors.pop(step), what)
                    raise WorkerError(f"{remote}; then {driver.name} got stuck in a "
                                      "collective")
                raise WorkerError(f"{driver.name} did not finish {what} within "
                                  f"{self.step_timeout_s:.0f}s: the group is hung")
            if driver.conn_in in ready:  # then also any peer that failed alongside it
                ready += [c for c in wait(list(conns), 0) if c not in ready]
            for conn in sorted(ready, key=lambda c: conns[c].rank):
                w = conns[conn]
                msg = w.recv()
                if w is driver and answer is None and driver_error is None:
                    if isinstance(msg, StepOutput | Reply):
                        answer = msg
                    else:
                        driver_error = (w, msg if isinstance(msg, Error) else
                                        Error("out of turn", step=step))
                    continue
                at, err = _peer_error(msg, step)
                if at < step:
                    raise WorkerError(f"{w.name} failed after its step was answered "
                                      f"({err.message})")
                self._step_errors.setdefault(at, (w, err))
                if at == step:
                    deadline = min(deadline, time.monotonic() + self.grace_s)
        if driver_error is not None and step not in self._step_errors and \
                driver_error[1].message.startswith("StageFailed"):
            self._await_cause(step, conns)
        error = self._step_errors.pop(step, None) or driver_error
        if error is None:
            return answer
        remote = self._remote_error(error, what)
        if self._inflight:  # the rest must be answered before a ping can be
            self._ping_owed = True
        else:
            self._ping(self.grace_s)
        raise remote

    def _await_cause(self, step: int, conns: dict) -> None:
        """The driver says an earlier stage failed ``step``: wait briefly for that stage's
        own error (the one worth reporting)."""
        deadline = time.monotonic() + self.grace_s
        others = [c for c in conns if conns[c].rank != self.driver]
        while step not in self._step_errors:
            ready = wait(others, max(0.0, deadline - time.monotonic()))
            if not ready:
                return
            for conn in ready:
                at, err = _peer_error(conns[conn].recv(), step)
                self._step_errors.setdefault(at, (conns[conn], err))

    def _check_quiet(self) -> None:
        """Before a call: no rank may have spoken since the last one. A late ``Error`` means a
        rank failed after rank 0 had answered a step: the group's state is no longer the same
        on every rank, so the group has failed."""
        for conn in wait([w.conn_in for w in self.workers], 0):
            w = next(w for w in self.workers if w.conn_in is conn)
            msg = w.recv()
            detail = msg.message if isinstance(msg, Error) else "an unexpected message"
            raise WorkerError(f"{w.name} failed after its step was answered ({detail})")

    def _ping(self, timeout_s: float) -> None:
        for w in self.workers:
            w.send(Call("ping"))
        self._gather_all(timeout_s, what="a health check")

    def _remote_error(self, failed: tuple[_Worker, Error], what: str) -> RemoteError:
        w, err = failed
        log.error("%s raised during %s: %s", w.name, what, err.detail or err.message)
        return RemoteError(f"{what} failed on rank {w.rank}: {err.message}")

    def _kill(self) -> None:
        if self._finalizer.detach() is not None:
            _stop(self.workers, self._cleanups, graceful=False)


def _peer_error(msg: Any, step: int) -> tuple[int, Error]:
    """What a rank that does not answer steps said while ``step`` was awaited: the step its
    error names (``step`` if it names none) and the error (anything else is out of turn)."""
    err = msg if isinstance(msg, Error) else Error("out of turn", step=step)
    return (err.step if err.step >= 0 else step), err


def _unlink(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _stop(workers: list, cleanups: list[Callable[[], None]], graceful: bool = True) -> None:
    for w in workers:
        try:
            if graceful:
                w.send(Shutdown())
            else:
                w.proc.kill()
        except (OSError, WorkerError):  # already gone
            pass
    for w in workers:
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        for c in (w.conn_in, w.conn_out):
            c.close()
    for cleanup in cleanups:
        with contextlib.suppress(Exception):
            cleanup()

