"""Local executor: spawns one worker process per device of a group and talks to them over
OS pipes with typed messages.

A step goes to every rank at once; rank 0 answers. Any other rank's pipe becoming readable
mid-step means it failed or died, so waits watch every pipe. Workers watch their parent
process and exit when it is gone, and ``shutdown`` (also run at exit and on garbage
collection) stops and reaps them: no orphans.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from shardserve.config import ModelConfig
from shardserve.runtime import shm
from shardserve.runtime.devices import Device
from shardserve.runtime.messages import (
    Call,
    Error,
    Reply,
    Shutdown,
    StepInput,
    StepOutput,
    WorkerInit,
    decode,
    encode,
)


class WorkerError(RuntimeError):
    """A worker failed or died; the message says which rank and why."""


class _Worker:
    def __init__(self, rank: int, device: Device) -> None:
        self.rank, self.device = rank, device
        child_in, self_out = os.pipe()
        self_in, child_out = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS=str(len(device.cores)),
                   GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardserve.runtime.worker", str(child_in), str(child_out)],
            pass_fds=(child_in, child_out), env=env, stdin=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.conn_out = Connection(self_out, readable=False)
        self.conn_in = Connection(self_in, writable=False)

    def send(self, msg: Any) -> None:
        try:
            self.conn_out.send_bytes(encode(msg))
        except OSError:  # broken pipe: the process is gone
            raise WorkerError(f"worker rank {self.rank} ({self.device.name}) died "
                              f"(exit code {self.proc.poll()})") from None

    def recv(self) -> Any:
        try:
            msg = decode(self.conn_in.recv_bytes())
        except (EOFError, OSError):
            code = self.proc.wait(timeout=5)
            raise WorkerError(f"worker rank {self.rank} ({self.device.name}) died "
                              f"(exit code {code})") from None
        if isinstance(msg, Error):
            raise WorkerError(f"worker rank {self.rank} ({self.device.name}): {msg.message}")
        return msg


class Executor:
    """The processes of one device group. ``collective_rpc`` is the one control verb."""

    def __init__(self, config: ModelConfig, devices: list[Device],
                 shm_slot_bytes: int = 8 << 20) -> None:
        import torch.distributed as dist

        self.config = config
        self.devices = devices
        # The rendezvous store lives in this process, on loopback, on a port the OS picks.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        shm_path = None
        if len(devices) > 1 and devices[0].kind == "cpu" and shm.supported():
            shm_path = shm.create(len(devices), shm_slot_bytes)
        self.workers = [_Worker(rank, d) for rank, d in enumerate(devices)]
        self._finalizer = weakref.finalize(self, _stop, list(self.workers), shm_path)
        for w in self.workers:
            w.send(WorkerInit(
                rank=w.rank, world_size=len(devices), store_port=self._store.port,
                device_kind=w.device.kind, device_index=w.device.index,
                cores=list(w.device.cores), memory_budget=w.device.memory_budget,
                model_path=config.path, dtype=config.torch_dtype_name,
                max_model_len=config.context_len, shm_path=shm_path,
                shm_slot_bytes=shm_slot_bytes))
        try:
            self.load_stats = [r.value for r in self._gather_all()]
        except BaseException:
            self._finalizer.detach()
            _stop(self.workers, shm_path, graceful=False)  # others may be stuck joining
            raise
        _unlink(shm_path)  # every rank has it mapped now; nothing else may open it

    def collective_rpc(self, method: str, **kwargs: Any) -> list[Any]:
        """Run an allowed worker method on every rank; one result per rank."""
        with self._fail_whole_group():
            for w in self.workers:
                w.send(Call(method, kwargs))
            return [r.value for r in self._gather_all()]

    def execute_step(self, step: StepInput) -> StepOutput:
        with self._fail_whole_group():
            for w in self.workers:
                w.send(step)
            return self._wait_rank0()

    @contextlib.contextmanager
    def _fail_whole_group(self):
        """A rank that died or failed leaves its peers mid-collective: stop them all at once
        rather than let them wait on it."""
        if not self.alive:
            raise WorkerError("this deployment's workers were stopped after a failure; "
                              "create it again")
        dead = [w for w in self.workers if w.proc.poll() is not None]
        try:
            if dead:
                raise WorkerError(f"worker rank {dead[0].rank} ({dead[0].device.name}) died "
                                  f"(exit code {dead[0].proc.returncode})")
            yield
        except WorkerError:
            self._finalizer.detach()
            _stop(self.workers, None, graceful=False)
            raise

    def _gather_all(self) -> list[Reply]:
        out: dict[int, Reply] = {}
        pending = {w.conn_in: w for w in self.workers}
        while pending:
            for conn in wait(list(pending)):
                w = pending.pop(conn)
                out[w.rank] = w.recv()
        return [out[r] for r in range(len(self.workers))]

    def _wait_rank0(self) -> StepOutput:
        conns = {w.conn_in: w for w in self.workers}
        ready = wait(list(conns))
        for conn in ready:  # any other rank that speaks during a step is failing
            if conns[conn].rank != 0:
                conns[conn].recv()
                raise WorkerError(f"worker rank {conns[conn].rank} answered out of turn")
        return conns[ready[0]].recv()

    def shutdown(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive


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
