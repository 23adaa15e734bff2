"""The engine core: one replica's ``LLMEngine`` (scheduler, block manager, executor) in a
process of its own, so its busy loop never shares the HTTP process's GIL.

Started by the API side (``engine/core_client.py``) as ``python -P -m shardserve.engine.core
FD_IN FD_OUT LABEL`` (``runtime/process.py``); its workers are its children. It reads a
``CoreInit``, builds the engine (answering ``CoreReady``, or ``CoreFailed`` with the reason),
then loops: apply the commands that came in (add, abort, ping, stop), run one step if
anything is unfinished, and send one ``CoreOutputs`` with everything that changed. A thread
reads the pipe into a queue, so a burst of requests never blocks the sender while a step
runs. An idle core pings its workers every ``health_check_s``; a failed group
(``WorkerError``) or a bug in the loop is reported as ``CoreFailed`` and the process exits,
killing its workers: the API side's supervisor starts a new core. A request's own failure
stays that request's (``LLMEngine``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from shardserve.engine.core_messages import (
    Abort,
    AddRequest,
    CoreFailed,
    CoreInit,
    CoreOutputs,
    CoreReady,
    Ping,
    Refusal,
    Stop,
)
from shardserve.engine.errors import EngineUnavailable, InvalidRequest
from shardserve.engine.supervisor import one_line
from shardserve.runtime.executor import WorkerError
from shardserve.runtime.process import serve_pipes
from shardserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Channel(Protocol):
    def send(self, msg: Any) -> None: ...
    def recv(self) -> Any: ...  # EOFError when the other side is gone


class EngineCore:
    def __init__(self, engine, channel: Channel, health_check_s: float = 2.0,
                 ping_timeout_s: float = 10.0) -> None:
        self.engine, self.channel = engine, channel
        self.health_check_s, self.ping_timeout_s = health_check_s, ping_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name="core-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                self._inbox.put(self.channel.recv())
            except (EOFError, OSError):  # the API side is gone: stop
                self._inbox.put(Stop())
                return

    def run(self) -> None:
        """Serve until ``Stop``; raises when the group failed (``WorkerError``) or the loop
        has a bug."""
        last_check = time.monotonic()
        while True:
            busy = self.engine.has_unfinished()
            commands = self._take(block=not busy)
            out = CoreOutputs()
            for cmd in commands:
                if isinstance(cmd, Stop):
                    return
                self._apply(cmd, out)
            if not busy and not commands and \
                    time.monotonic() - last_check >= self.health_check_s:
                self.engine.check_health(self.ping_timeout_s)
                last_check = time.monotonic()
            if self.engine.has_unfinished():
                out.outputs.extend(self.engine.step())
                last_check = time.monotonic()
            if commands or out.outputs:
                out.load = self._load()
                self.channel.send(out)

    def _take(self, block: bool) -> list:
        items = []
        try:
            items.append(self._inbox.get(timeout=self.health_check_s) if block
                         else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _apply(self, cmd: Any, out: CoreOutputs) -> None:
        if isinstance(cmd, AddRequest):
            self._add(cmd, out)
        elif isinstance(cmd, Abort):
            for request_id in cmd.request_ids:
                delta = self.engine.abort_request(request_id)
                if delta is not None:
                    out.outputs.append(delta)
            if cmd.ack is not None:
                out.acks.append(cmd.ack)
        elif isinstance(cmd, Ping):
            out.pongs.append(cmd.n)
        else:
            raise TypeError(f"unexpected message {type(cmd).__name__}")

    def _add(self, cmd: AddRequest, out: CoreOutputs) -> None:
        try:
            params = SamplingParams(**cmd.params)
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, params, cmd.prompt,
                                    cmd.cache_salt, cmd.features)
        except InvalidRequest as e:
            out.refused.append(Refusal(cmd.request_id, "invalid", str(e), e.param))
        except EngineUnavailable as e:
            out.refused.append(Refusal(cmd.request_id, "unavailable", str(e)))
        except Exception as e:  # a bug in admission: this request's, not the group's
            log.exception("adding request %s failed", cmd.request_id)
            out.refused.append(Refusal(cmd.request_id, "failed", "internal error while "
                                       f"admitting it ({type(e).__name__})"))

    def _load(self) -> list[float]:
        e = self.engine
        used = e.blocks.num_blocks - e.blocks.num_free
        return [len(e.scheduler.running), len(e.scheduler.waiting), used / e.blocks.num_blocks]


def build(init: CoreInit):
    """The engine ``init`` describes (its workers started and loaded)."""
    from shardserve.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from shardserve.engine.llm_engine import LLMEngine
    from shardserve.engine.tokenizer import load_tokenizer
    from shardserve.runtime.devices import Device
    from shardserve.runtime.precision import Precision

    model = ModelConfig(**init.model)
    devices = [Device(**{**d, "cores": tuple(d["cores"])}) for d in init.devices]
    precision = Precision(**init.precision) if init.precision else None
    parallel = ParallelConfig(init.tp, init.pp, init.pipeline_split, init.executor,
                              init.ray_address)
    return LLMEngine(model, parallel, devices, CacheConfig(**init.cache),
                     SchedulerConfig(**init.scheduler), load_tokenizer(model), init.label,
                     init.step_timeout_s, precision)


def serve(channel: Channel, build: Callable[[], Any], health_check_s: float,
          ping_timeout_s: float) -> bool:
    """Build the engine, say so, serve until told to stop; False if it failed (said too)."""
    try:
        engine = build()
    except Exception as e:
        channel.send(CoreFailed(one_line(e), starting=True,
                                bad_config=isinstance(e, ValueError)))
        return False
    channel.send(CoreReady())
    try:
        EngineCore(engine, channel, health_check_s, ping_timeout_s).run()
    except Exception as e:
        if not isinstance(e, WorkerError):
            log.exception("the engine loop failed")
        engine.shutdown(kill=True)
        channel.send(CoreFailed(one_line(e)))
        return False
    engine.shutdown()
    return True


def main() -> None:
    pipes = serve_pipes()
    ok = False
    try:
        init: CoreInit = pipes.recv()
        logging.basicConfig(level=init.log_level, format="%(asctime)s %(levelname)s "
                            f"core {os.getpid()} %(name)s: %(message)s")
        if init.cpus:
            os.sched_setaffinity(0, init.cpus)
        ok = serve(pipes, lambda: build(init), init.health_check_s, init.ping_timeout_s)
    except (EOFError, OSError):  # the API side went away
        pass
    finally:
        os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
