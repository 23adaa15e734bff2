"""Ray executor: the same workers, as Ray actors, for device groups that span machines.

Each rank is an actor that runs ``runtime.worker.Worker``: ``start`` and ``handle`` take and
return the msgpack messages the local executor sends over pipes (Ray carries them as bytes;
nothing of ours is pickled). Each pipeline stage's tp ranks form one placement group with
the STRICT_PACK strategy, so a tp group sits on one node (its all-reduces go through shared
memory there, as locally); the stages are placed independently and may span nodes, their
hidden states going over gloo. The group meets in a key-value store kept by a small actor
(no TCP store listens anywhere), and gloo's pair sockets bind the interface of each node's
Ray address (loopback on a one-machine cluster).

A thread per rank pumps the actor's replies into a local pipe, so the failure protocol of
``runtime/executor.py`` (deadlines, which rank failed, a peer stuck in a collective) runs
unchanged. Once loaded, a rank on the executor's own node takes its steps over a pair of
named pipes in a private folder instead (one long-running actor call serves them): a Ray
actor call costs ~1 ms a round trip, a pipe ~0.05 ms. Ranks on other nodes stay on Ray's
calls. An actor that dies (killed, or its node's raylet gone) closes its pipe: the group
has failed (``WorkerError``) and its owner starts a new one, whose placement groups wait
until the cluster has room again.

Ray is an optional dependency (``pip install 'shardserve[ray]'``), imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import queue
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from shardserve.config import ModelConfig
from shardserve.runtime import shm
from shardserve.runtime.devices import Device
from shardserve.runtime.executor import Executor, WorkerError, _unlink
from shardserve.runtime.messages import Shutdown, WorkerInit, decode, encode
from shardserve.runtime.worker import _error


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("the Ray executor needs Ray: pip install 'shardserve[ray]'") from None
    return ray


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one started on this machine with
    ``ray start``), or, with None, start a local one in this process; no-op if connected.
    The dashboard stays off and Ray's log lines stay in its own files. A local instance
    listens on loopback only (Ray's local mode, set before Ray is first imported) and uses
    token authentication (Ray's default for local clusters since 2.59)."""
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except ConnectionError as e:  # maybe for now only: the supervisor tries again
        raise WorkerError(f"cannot reach the Ray cluster at {address!r} ({e}); start one "
                          "with `ray start --head` or pass its address (--ray-address)") \
            from None


class RayExecutor(Executor):
    """``Executor`` over Ray actors. ``address``: the cluster to join (see ``connect``);
    ``placement_timeout_s``: how long to wait for the cluster to have room for every stage
    before giving up (a restart after a node failure waits here for the node to return)."""

    def __init__(self, config: ModelConfig, devices: list[Device], label: str = "",
                 step_timeout_s: float = 300.0, compute_dtype: str | None = None,
                 load_timeout_s: float = 1800.0, shm_slot_bytes: int = 8 << 20,
                 kv_cache_dtype: str | None = None, tp: int | None = None,
                 pipeline_split: tuple[float, ...] | None = None, address: str | None = None,
                 placement_timeout_s: float = 300.0) -> None:
        self._configure(config, devices, step_timeout_s, compute_dtype, shm_slot_bytes,
                        kv_cache_dtype, tp, pipeline_split)
        ray = import_ray()
        connect(address)
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        label = label or os.path.basename(os.path.normpath(config.path))
        tp, pp = self.tp, self.pp
        cpus = [max(1, len(d.cores)) for d in devices]
        pgs = []
        for s in range(pp):
            pg = placement_group([{"CPU": cpus[s * tp + i]} for i in range(tp)],
                                 strategy="STRICT_PACK", name=f"{label}:stage{s}")
            self._cleanups.append(functools.partial(remove_placement_group, pg))
            pgs.append(pg)
        try:
            ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=pp,
                                timeout=placement_timeout_s)
            if len(ready) < pp:  # a node may come back: a failure to retry, not a bad config
                raise WorkerError(
                    f"Ray could not place {label} within {placement_timeout_s:.0f}s: each of "
                    f"its {pp} stage(s) needs {tp} x {cpus[0]} CPU on one node; the cluster "
                    f"has {_free_cpus(ray)} free")
            store = ray.remote(num_cpus=0)(_StoreActor).remote()
            self._cleanups.append(functools.partial(ray.kill, store))
            rank_actor = ray.remote(_RankActor)
            env = {"OMP_NUM_THREADS": str(cpus[0])}
            actors = [rank_actor.options(
                num_cpus=cpus[r], runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pgs[r // tp], placement_group_bundle_index=r % tp)).remote()
                for r in range(len(devices))]
            where = ray.get([a.where.remote() for a in actors], timeout=load_timeout_s)
            self.workers.extend(_RayRank(r, d, a, store, *w) for r, (d, a, w)
                                in enumerate(zip(devices, actors, where, strict=True)))
        except BaseException:
            self._kill()
            raise
        shm_paths: list[str | None] = [None] * pp
        if tp > 1 and devices[0].kind == "cpu":  # one exchange per stage, on its node
            shm_paths = ray.get([actors[s * tp].create_shm.remote(tp, shm_slot_bytes)
                                 for s in range(pp)])
        try:
            self._start(lambda w: self._worker_init(w, "", shm_paths[w.rank // tp], cores=[]),
                        load_timeout_s)
        finally:
            with contextlib.suppress(Exception):  # mapped by every rank now, or failed
                ray.get([actors[s * tp].unlink.remote(p) for s, p in enumerate(shm_paths)],
                        timeout=30)
        here = ray.get_runtime_context().get_node_id()
        try:
            for w in self.workers:
                if w.node_id == here:
                    w.go_direct()
        except BaseException:
            self._kill()
            raise


def _free_cpus(ray) -> str:
    with contextlib.suppress(Exception):
        return f"{ray.available_resources().get('CPU', 0):g} CPU"
    return "an unknown number of CPUs"


class _ActorProc:
    """What the executor reads of a worker process, for an actor."""

    def __init__(self, rank: _RayRank, pid: int) -> None:
        self._rank, self.pid = rank, pid
        self.returncode: int | None = None
        self.why = ""

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.returncode, self.why = -9, "killed"
        with contextlib.suppress(Exception):
            import_ray().kill(self._rank.actor, no_restart=True)

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:  # not killed: wait for its calls to end
            self._rank.pump.join(timeout)
        return self.returncode  # killed: Ray reaps it (its pump ends when Ray says so)


class _RayRank:
    """One rank's actor, seen as the executor sees a local worker: ``send``, ``recv``, a
    ``conn_in`` to wait on, a ``proc`` to poll and kill. Replies come back in order (an
    actor runs its calls one at a time, in the order sent); a pump thread writes each
    non-empty one to the pipe, and closes it when the actor is gone."""

    def __init__(self, rank: int, device: Device, actor: Any, store: Any, node_id: str,
                 ip: str, pid: int) -> None:
        self.rank, self.device, self.actor, self.store = rank, device, actor, store
        self.node_id, self.ip = node_id, ip
        r, w = os.pipe()
        self.conn_in, self.conn_out = Connection(r, writable=False), Connection(w, readable=False)
        self.direct = False  # steps over named pipes (go_direct), not Ray calls
        self.proc = _ActorProc(self, pid)
        self._refs: queue.SimpleQueue = queue.SimpleQueue()
        self.pump = threading.Thread(target=self._pump, daemon=True, name=f"ray-rank{rank}")
        self.pump.start()

    @property
    def name(self) -> str:
        return f"worker rank {self.rank} ({self.device.name}, Ray actor pid {self.proc.pid} " \
            f"on node {self.node_id[:8]} at {self.ip})"

    def go_direct(self) -> None:
        """From now on, messages go over two named pipes (this node only): the actor's
        ``serve_pipes`` call runs until the executor closes them or the actor dies, which
        closes them from its side (EOF here)."""
        folder = tempfile.mkdtemp(prefix="shardserve-ray-")  # mode 0700
        try:
            to_actor, from_actor = (os.path.join(folder, n) for n in ("in", "out"))
            os.mkfifo(to_actor, 0o600)
            os.mkfifo(from_actor, 0o600)
            self._refs.put(self.actor.serve_pipes.remote(to_actor, from_actor))
            # the same order as the actor's opens, or both would wait forever; the first
            # waits (boundedly) for the actor to open its reading end
            deadline = time.monotonic() + 60
            while True:
                try:
                    w = os.open(to_actor, os.O_WRONLY | os.O_NONBLOCK)
                    break
                except OSError as e:
                    if e.errno != errno.ENXIO or self.proc.returncode is not None or \
                            time.monotonic() > deadline:
                        raise WorkerError(f"{self.name} did not open its pipes") from None
                    time.sleep(0.002)
            os.set_blocking(w, True)
            r = os.open(from_actor, os.O_RDONLY)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        old = (self.conn_in, self.conn_out)
        self.conn_in, self.conn_out = Connection(r, writable=False), Connection(w, readable=False)
        self.direct = True
        for c in old:  # the pump writes nothing more there: serve_pipes answers None
            c.close()

    def _died(self) -> WorkerError:
        return WorkerError(f"{self.name} died ({self.proc.why or 'its pipe closed'})")

    def send(self, msg: Any) -> None:
        if self.proc.returncode is not None:
            raise self._died()
        if isinstance(msg, Shutdown):
            if self.direct:
                with contextlib.suppress(OSError):
                    self.conn_out.send_bytes(encode(msg))
            self.proc.kill()
            self._refs.put(None)
            return
        if isinstance(msg, WorkerInit) and not self.direct:
            self._refs.put(self.actor.start.remote(encode(msg), self.store))
            return
        self.send_encoded(encode(msg))

    def send_encoded(self, data: bytes) -> None:
        """A step or call ``encode`` made once for every rank."""
        if self.proc.returncode is not None:
            raise self._died()
        if self.direct:
            try:
                self.conn_out.send_bytes(data)
            except OSError:  # the actor is gone
                raise self._died() from None
            return
        self._refs.put(self.actor.handle.remote(data))

    def recv(self) -> Any:
        try:
            return decode(self.conn_in.recv_bytes())
        except (EOFError, OSError):
            raise self._died() from None

    def _pump(self) -> None:
        ray = import_ray()
        while True:
            ref = self._refs.get()
            if ref is None:
                break
            try:
                out = ray.get(ref)
            except Exception as e:  # the actor died: its node, a kill, a crash
                if self.proc.returncode is None:
                    self.proc.returncode, self.proc.why = -1, _error(e).message
                break
            if out is not None and not self.direct:
                try:
                    self.conn_out.send_bytes(out)
                except OSError:  # the executor closed the pipe
                    return
        if not self.direct:  # (direct: the actor's own end closes with it)
            with contextlib.suppress(OSError):
                self.conn_out.close()


class _RankActor:
    """A Ray actor around ``runtime.worker.Worker`` (decorated with ``ray.remote`` at use)."""

    def __init__(self) -> None:
        from shardserve.runtime.worker import Worker

        self.worker = Worker()

    def where(self) -> tuple[str, str, int]:
        ray = import_ray()
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), \
            os.getpid()

    def create_shm(self, size: int, slot_bytes: int) -> str | None:
        return shm.create(size, slot_bytes) if shm.supported() else None

    def unlink(self, path: str | None) -> None:
        _unlink(path)

    def start(self, init: bytes, store: Any) -> bytes:
        iface = interface_of(import_ray().util.get_node_ip_address())
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
        return encode(self.worker.start(decode(init), actor_store(store)))

    def handle(self, msg: bytes) -> bytes | None:
        reply = self.worker.handle(decode(msg))
        return None if reply is None else encode(reply)

    def serve_pipes(self, path_in: str, path_out: str) -> None:
        """Serve messages from the named pipe ``path_in``, replies to ``path_out``, until
        EOF or ``Shutdown`` (the executor's side of ``_RayRank.go_direct``)."""
        conn_in = Connection(os.open(path_in, os.O_RDONLY), writable=False)
        conn_out = Connection(os.open(path_out, os.O_WRONLY), readable=False)
        try:
            self.worker.serve(conn_in, conn_out)
        finally:
            conn_in.close()
            conn_out.close()


def interface_of(ip: str) -> str | None:
    """The network interface holding address ``ip`` (Linux), for gloo to bind; None if not
    found (gloo then picks by hostname)."""
    if ip.startswith("127."):
        return "lo"
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                contextlib.suppress(OSError):
            req = struct.pack("256s", name.encode()[:15])
            addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
            if addr == ip:
                return name
    return None


class _StoreActor:
    """The group's rendezvous: a key-value store in an async actor (``torch.distributed``'s
    store operations, over Ray's authenticated channels instead of a TCP store)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def set(self, key: str, value: bytes) -> None:
        async with self._cond():
            self.data[key] = value
            self._cond().notify_all()

    async def get(self, key: str, timeout_s: float) -> bytes:
        async with self._cond():
            await asyncio.wait_for(self._cond().wait_for(lambda: key in self.data), timeout_s)
            return self.data[key]

    async def add(self, key: str, n: int) -> int:
        async with self._cond():
            value = int(self.data.get(key, b"0")) + n
            self.data[key] = str(value).encode()
            self._cond().notify_all()
            return value

    async def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        async with self._cond():
            current = self.data.get(key)
            if (current is None and not expected) or current == expected:
                self.data[key] = desired
                self._cond().notify_all()
                return desired
            return expected if current is None else current

    async def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    async def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def num_keys(self) -> int:
        return len(self.data)


def actor_store(actor: Any):
    """A ``torch.distributed.Store`` whose keys live in ``actor`` (a ``_StoreActor``); the
    class is made here so that importing this module does not import torch."""
    import datetime

    import torch.distributed as dist

    class _ActorStore(dist.Store):
        def __init__(self, actor: Any, timeout_s: float = 300.0) -> None:
            super().__init__()
            self.actor, self.timeout_s = actor, timeout_s

        def _call(self, method: str, *args: Any) -> Any:
            return import_ray().get(getattr(self.actor, method).remote(*args))

        def set(self, key: str, value: str | bytes) -> None:
            self._call("set", key, value.encode() if isinstance(value, str) else bytes(value))

        def get(self, key: str) -> bytes:
            return self._call("get", key, self.timeout_s)

        def add(self, key: str, n: int) -> int:
            return self._call("add", key, n)

        def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
            enc = lambda v: v.encode() if isinstance(v, str) else bytes(v)  # noqa: E731
            return self._call("compare_set", key, enc(expected), enc(desired))

        def check(self, keys: list[str]) -> bool:
            return self._call("check", list(keys))

        def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
            t = self.timeout_s if timeout is None else timeout.total_seconds()
            for k in keys:
                self._call("get", k, t)

        def delete_key(self, key: str) -> bool:
            return self._call("delete_key", key)

        def num_keys(self) -> int:
            return self._call("num_keys")

    return _ActorStore(actor)
