"""An engine core seen from the API process: started, fed, read, checked and stopped here.

A ``CoreClient`` owns one core process (``engine/core.py``), or anything with the same pipe
surface (a core on a thread, in tests). ``start`` waits for the core's ``CoreReady`` and
raises what the core reported if it could not start. A reader thread then hands each
``CoreOutputs`` to ``on_outputs``; when the core reports a failure, exits or its pipe closes,
``on_lost`` is called once with the reason. ``check_health`` is the supervisor's probe: a ping
the core answers between two steps. ``send`` never raises: a message to a core that is gone
is dropped, and ``on_lost`` says why.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from shardserve.engine.core_messages import CoreFailed, CoreOutputs, CoreReady, Ping, Stop

log = logging.getLogger(__name__)


class CoreLost(RuntimeError):
    """The engine core failed, exited or stopped answering; the message says which."""


class Process(Protocol):
    """A started core: ``runtime/process.Child``, or a stand-in for tests."""

    pid: int

    def send(self, msg: Any) -> None: ...
    def recv(self) -> Any: ...
    def exit_code(self, wait_s: float = 0.0) -> int | None: ...
    def kill(self) -> None: ...
    def reap(self, timeout_s: float = 10.0) -> None: ...


class CoreClient:
    def __init__(self, process: Process, on_outputs: Callable[[CoreClient, CoreOutputs], None],
                 on_lost: Callable[[CoreClient, Exception], None],
                 answer_timeout_s: float) -> None:
        """``answer_timeout_s``: the longest a step may keep the core from answering."""
        self.process, self.on_outputs, self.on_lost = process, on_outputs, on_lost
        self.answer_timeout_s = answer_timeout_s
        self._send_lock = threading.Lock()
        self._pongs = itertools.count()
        self._pong_seen = -1
        self._pong = threading.Condition()
        self._lost = False
        self._reader: threading.Thread | None = None

    def start(self) -> CoreClient:
        """Wait for the core to load; raise ``ValueError`` (a bad model or setting) or
        ``CoreLost`` if it could not."""
        try:
            first = self.process.recv()
        except (EOFError, OSError):
            first = CoreFailed(f"the engine core exited while starting (exit code "
                               f"{self.process.exit_code(5)})", starting=True)
        if not isinstance(first, CoreReady):
            self.process.kill()
            self.process.reap()
            message = first.message if isinstance(first, CoreFailed) else \
                f"the engine core sent {type(first).__name__} while starting"
            if isinstance(first, CoreFailed) and first.bad_config:
                raise ValueError(message)
            raise CoreLost(message)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"core-reader-{self.process.pid}")
        self._reader.start()
        return self

    def send(self, msg: Any) -> None:
        with self._send_lock, contextlib.suppress(OSError):  # gone: the reader reports it
            self.process.send(msg)

    def _read(self) -> None:
        reason: Exception
        while True:
            try:
                msg = self.process.recv()
            except (EOFError, OSError):
                code = self.process.exit_code(2)
                reason = CoreLost(f"the engine core (pid {self.process.pid}) exited "
                                  f"(exit code {code})")
                break
            if isinstance(msg, CoreFailed):
                reason = CoreLost(msg.message)
                break
            if msg.pongs:
                with self._pong:
                    self._pong_seen = max(self._pong_seen, *msg.pongs)
                    self._pong.notify_all()
            try:
                self.on_outputs(self, msg)
            except Exception:  # a bug on our side must not stop the reading
                log.exception("handling the engine core's outputs failed")
        self._lost = True
        with self._pong:
            self._pong.notify_all()
        self.on_lost(self, reason)

    def check_health(self, timeout_s: float) -> None:
        """Raise ``CoreLost`` unless the core answers a ping within ``timeout_s`` (plus the
        time one step may take)."""
        n = next(self._pongs)
        self.send(Ping(n))
        deadline = time.monotonic() + timeout_s + self.answer_timeout_s
        with self._pong:
            while self._pong_seen < n and not self._lost:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CoreLost(f"the engine core (pid {self.process.pid}) did not answer "
                                   f"a health check in time: it is hung")
                self._pong.wait(left)
        if self._lost:
            raise CoreLost(f"the engine core (pid {self.process.pid}) is gone")

    def shutdown(self, kill: bool = False) -> None:
        """Stop the core and its workers: politely (it finishes its step and stops its
        workers), or at once with ``kill``."""
        if kill:
            self.process.kill()
        else:
            self.send(Stop())
        self.process.reap(timeout_s=30.0)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=10)
