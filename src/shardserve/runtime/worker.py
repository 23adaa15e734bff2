"""A worker process: one device, one rank of one deployment's group.

Started by the executor as ``python -P -m shardserve.runtime.worker FD_IN FD_OUT LABEL``
(``-P`` and a neutral working directory: nothing from the caller's folder is importable; LABEL
only names the process for ``ps``: deployment, replica and rank). It reads a ``WorkerInit``
from its pipe, pins itself to its cores, joins the group through a private file store (no TCP
listener; gloo's own pair sockets bind loopback), loads its shard, and then serves steps and
control calls until told to stop or its parent goes. An exception in a step or call is
answered as an ``Error`` (a one-line message, the traceback apart for the log) and the worker
keeps serving: only the executor decides that a group has failed.
"""

from __future__ import annotations

import ctypes
import os
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

from shardserve.runtime.messages import (
    Call,
    DriverCall,
    Error,
    Reply,
    Shutdown,
    StepInput,
    WorkerInit,
)
from shardserve.runtime.messages import decode as _decode
from shardserve.runtime.messages import encode as _encode
from shardserve.runtime.process import serve_pipes

# The only methods a Call may name.
_CALLS = ("allocate_kv_cache", "free_kv_cache", "stats", "prompt_logits", "encode", "ping",
          "time_all_reduce")
_DRIVER_CALLS = ("recommend",)  # ... and a DriverCall


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> bool:
    """Let a step reuse the pages the step before freed (glibc; elsewhere a no-op, False).

    By default glibc maps a large block (activations of a prefill chunk, logits) fresh on
    every allocation and unmaps it on free, and hands the heap's free top back to the OS:
    every step then takes a page fault per 4 KiB it touches. Measured on the llama-110m shape,
    a 2048-token prefill step faulted in ~135,000 pages (~540 MB) and ran 7-15% slower than
    with the memory kept; in a VM each fault also costs the hypervisor. Blocks up to 1 GiB
    now come from the heap and freed memory stays in it, so the process holds its peak
    activation working set, the reserve the memory plan already counts (``malloc_trim`` after
    loading gives back what loading alone needed)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                    and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False




def _setup_device(init: WorkerInit):
    import torch

    if init.cores:  # a Ray actor gets CPUs as a count; Ray places it, nothing pins it
        os.sched_setaffinity(0, init.cores)
    torch.set_num_threads(len(init.cores) or init.num_threads or 1)
    _keep_freed_memory()
    if init.device_kind == "cuda":
        torch.cuda.set_device(init.device_index)
        return torch.device("cuda", init.device_index)
    return torch.device("cpu")


def _join_group(init: WorkerInit, store=None):
    """This rank's tensor-parallel group and its link to the neighbouring pipeline stages.

    World rank ``r`` is tp rank ``r % tp`` of stage ``r // tp``; each stage's tp ranks form a
    subgroup (every rank creates every subgroup, in the same order, as torch.distributed
    requires), and hidden states go from a rank to the same tp rank of the next stage."""
    import torch.distributed as dist

    from shardserve.runtime.group import PipeLink, TorchGroup
    from shardserve.runtime.shm import ShmExchange

    tp = init.tp or init.world_size
    if init.world_size == 1:
        return TorchGroup(None, 0, 1), None
    store = store or dist.FileStore(init.store_path, init.world_size)
    backend = "nccl" if init.device_kind == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=init.rank,
                            world_size=init.world_size, timeout=timedelta(minutes=5))
    stage, tp_rank, pp = init.rank // tp, init.rank % tp, init.world_size // tp
    pg = dist.group.WORLD
    if pp > 1:
        pgs = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None
               for s in range(pp)]
        pg = pgs[stage]
    shm = None
    if init.shm_path and tp > 1:
        shm = ShmExchange(init.shm_path, tp_rank, tp, init.shm_slot_bytes)
    group = TorchGroup(pg, tp_rank, tp, shm) if tp > 1 else TorchGroup(None, 0, 1)
    link = None
    if pp > 1:
        link = PipeLink(init.rank - tp if stage > 0 else None,
                        init.rank + tp if stage < pp - 1 else None)
    return group, link


class Worker:
    """One rank. ``start`` joins the group and loads the shard; ``handle`` answers one message
    (None: a step on a rank that does not answer steps). Both transports drive it: the local
    executor's pipes (``serve``) and the Ray executor's actors (``runtime/ray_executor.py``).
    An exception becomes an ``Error`` (steps count alike on every rank, so an error names
    its step) and the worker keeps serving."""

    def __init__(self) -> None:
        self.runner = None
        self.steps = 0
        self.is_driver = False  # rank 0 of the last stage: answers steps and driver calls

    def start(self, init: WorkerInit, store=None) -> Reply | Error:
        """``store``: a ``torch.distributed`` store to meet the group in (default: the
        ``FileStore`` at ``init.store_path``)."""
        try:
            from shardserve.config import ModelConfig
            from shardserve.planner.partition import split_layers
            from shardserve.planner.specs import DLRMSpec
            from shardserve.runtime.model_runner import ModelRunner, trim_heap

            self.is_driver = init.rank == init.world_size - (init.tp or init.world_size)
            device = _setup_device(init)
            group, link = _join_group(init, store)
            config = ModelConfig(init.model_path, init.dtype, init.max_model_len,
                                 init.quantization)
            stage = None
            if link is not None:  # the executor sends the split it planned
                tp = init.tp or init.world_size
                stage = split_layers(config.spec.num_layers, init.world_size // tp,
                                     tuple(init.pipeline_split))[init.rank // tp]
            if isinstance(config.spec, DLRMSpec):
                from shardserve.runtime.rec_runner import RecRunner

                self.runner = RecRunner(config, group, device, init.memory_budget)
            else:
                self.runner = ModelRunner(config, group, device, init.memory_budget,
                                          init.compute_dtype, init.kv_cache_dtype, stage, link)
            trim_heap()
        except Exception as e:  # the caller reports why we could not start
            return _error(e)
        return Reply(self.runner.stats())

    def handle(self, msg: object) -> object | None:
        step = -1
        try:
            if isinstance(msg, StepInput):
                step, self.steps = self.steps, self.steps + 1
                return self.runner.step(msg)
            if isinstance(msg, DriverCall) and msg.method in _DRIVER_CALLS:
                step, self.steps = self.steps, self.steps + 1
                value = getattr(self.runner, msg.method)(**msg.kwargs)
                return Reply(value) if self.is_driver else None
            if isinstance(msg, Call) and msg.method in _CALLS:
                return Reply(getattr(self.runner, msg.method)(**msg.kwargs))
            return Error(f"unknown message {type(msg).__name__}")
        except Exception as e:
            return _error(e, step)

    def serve(self, conn_in: Connection, conn_out: Connection) -> None:
        """Answer messages from ``conn_in`` on ``conn_out`` until ``Shutdown`` or EOF (the
        other side is gone)."""
        while True:
            try:
                msg = _decode(conn_in.recv_bytes())
            except (EOFError, OSError):
                return
            if isinstance(msg, Shutdown):
                return
            reply = self.handle(msg)
            if reply is not None:
                conn_out.send_bytes(_encode(reply))


def serve(conn_in: Connection, conn_out: Connection) -> None:
    worker = Worker()
    started = worker.start(_decode(conn_in.recv_bytes()))
    conn_out.send_bytes(_encode(started))
    if not isinstance(started, Error):
        worker.serve(conn_in, conn_out)


def _error(e: Exception, step: int = -1) -> Error:
    first = (str(e).strip().splitlines() or [""])[0][:500]
    return Error(f"{type(e).__name__}: {first}", "".join(traceback.format_exception(e)), step)


def main() -> None:
    pipes = serve_pipes()
    try:
        serve(pipes.conn_in, pipes.conn_out)
    finally:
        pipes.conn_out.close()
        os._exit(0)  # skip interpreter teardown: gloo threads may still hold the group


if __name__ == "__main__":
    main()
