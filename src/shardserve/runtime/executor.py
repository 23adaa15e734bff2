"""Local executor: spawns one worker process per device of a group and talks to them over
OS pipes with typed messages.

A step goes to every rank at once; rank 0 answers. Every wait has a deadline and watches
every rank's pipe, so the executor tells apart the two ways a call can go wrong:

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
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import wait
from typing import Any

from shardserve.config import ModelConfig
from shardserve.runtime import shm
from shardserve.runtime.devices import Device
from shardserve.runtime.messages import (
    Call,
    Error,
    Shutdown,
    StepInput,
    StepOutput,
    WorkerInit,
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
        env = dict(os.environ, OMP_NUM_THREADS=str(len(device.cores)),
                   GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo")
        self.child = Child("shardserve.runtime.worker", f"{label}:rank{rank}", env)
        self.proc, self.conn_in, self.conn_out = self.child.proc, self.child.conn_in, \
            self.child.conn_out

    @property
    def name(self) -> str:
        return f"worker rank {self.rank} ({self.device.name}, pid {self.proc.pid})"

    def send(self, msg: Any) -> None:
        try:
            self.child.send(msg)
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

    ``step_timeout_s`` bounds every step and call (a rank that has not answered by then is
    hung); ``load_timeout_s`` bounds start-up. Calls are serialised by a lock, so a health
    check from another thread never interleaves with a step."""

    def __init__(self, config: ModelConfig, devices: list[Device], label: str = "",
                 step_timeout_s: float = 300.0, compute_dtype: str | None = None,
                 load_timeout_s: float = 1800.0, shm_slot_bytes: int = 8 << 20,
                 kv_cache_dtype: str | None = None) -> None:
        self.config, self.devices = config, devices
        self.step_timeout_s = step_timeout_s
        self.grace_s = 10.0  # how long the peers of a rank that raised get to answer
        self._lock = threading.Lock()
        rendezvous = tempfile.mkdtemp(prefix="shardserve-rdv-")  # mode 0700
        shm_path = None
        if len(devices) > 1 and devices[0].kind == "cpu" and shm.supported():
            shm_path = shm.create(len(devices), shm_slot_bytes)
        label = label or os.path.basename(os.path.normpath(config.path))
        self.workers = [_Worker(rank, d, label) for rank, d in enumerate(devices)]
        self._finalizer = weakref.finalize(self, _stop, list(self.workers), shm_path)
        try:
            for w in self.workers:
                w.send(WorkerInit(
                    rank=w.rank, world_size=len(devices),
                    store_path=os.path.join(rendezvous, "store"), device_kind=w.device.kind,
                    device_index=w.device.index, cores=list(w.device.cores),
                    memory_budget=w.device.memory_budget,
                    model_path=os.path.abspath(config.path), dtype=config.torch_dtype_name,
                    compute_dtype=compute_dtype or config.torch_dtype_name,
                    max_model_len=config.context_len, quantization=config.quantization,
                    shm_path=shm_path,
                    shm_slot_bytes=shm_slot_bytes, kv_cache_dtype=kv_cache_dtype))
            self.load_stats = self._gather_all(load_timeout_s, what="loading")
        except BaseException:
            self._kill()  # others may be stuck joining the group
            raise
        finally:
            shutil.rmtree(rendezvous, ignore_errors=True)  # the group has formed, or failed
            _unlink(shm_path)  # every rank has it mapped now; nothing else may open it

    # -- calls -----------------------------------------------------------------------------
    def collective_rpc(self, method: str, **kwargs: Any) -> list[Any]:
        """Run an allowed worker method on every rank; one result per rank."""
        with self._lock, self._stop_on_failure():
            for w in self.workers:
                w.send(Call(method, kwargs))
            return self._gather_all(self.step_timeout_s, what=method)

    def execute_step(self, step: StepInput) -> StepOutput:
        with self._lock, self._stop_on_failure():
            for w in self.workers:
                w.send(step)
            return self._wait_rank0()

    def check_health(self, timeout_s: float) -> None:
        """Raise ``WorkerError`` if a rank has died or does not answer a ping within
        ``timeout_s``; safe from any thread (skipped while a call runs)."""
        if not self._lock.acquire(blocking=False):
            return  # a step is running: its own deadline (and its pipes' EOF) watch it
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
    @contextlib.contextmanager
    def _stop_on_failure(self):
        """A rank that died or hung leaves its peers mid-collective: stop them all at once."""
        if not self.alive:
            raise WorkerError("this deployment's workers were stopped after a failure")
        try:
            self._check_alive()
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

    def _wait_rank0(self) -> StepOutput:
        """Rank 0's answer to a step. Other ranks never answer a step, so one that speaks has
        failed; then the group is usable only if every rank answers a ping."""
        conns = {w.conn_in: w for w in self.workers}
        ready = wait(list(conns), self.step_timeout_s)
        if not ready:
            raise WorkerError(f"{self.workers[0].name} did not finish a step within "
                              f"{self.step_timeout_s:.0f}s: the group is hung")
        answer, error = None, None
        if self.workers[0].conn_in in ready:  # then also any peer that failed alongside it
            ready += [c for c in wait(list(conns)[1:], 0) if c not in ready]
        for conn in sorted(ready, key=lambda c: conns[c].rank):
            msg = conns[conn].recv()
            if conns[conn].rank == 0 and isinstance(msg, StepOutput):
                answer = msg
            elif error is None:
                error = (conns[conn], msg if isinstance(msg, Error) else Error("out of turn"))
        if error is None:
            return answer
        remote = self._remote_error(error, "a step")
        if answer is None and error[0].rank != 0:  # rank 0 may yet answer, or be stuck
            w = self.workers[0]
            if not wait([w.conn_in], self.grace_s):
                raise WorkerError(f"{remote}; then {w.name} got stuck in a collective")
            w.recv()
        self._ping(self.grace_s)
        raise remote

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
            _stop(self.workers, None, graceful=False)


def _unlink(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _stop(workers: list[_Worker], shm_path: str | None, graceful: bool = True) -> None:
    _unlink(shm_path)
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
