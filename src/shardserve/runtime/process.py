"""Our child processes: started as ``python -P -m MODULE FD_IN FD_OUT LABEL``, spoken to over
two OS pipes with the typed msgpack messages of ``runtime/messages.py`` (nothing pickled, no
socket). ``-P`` and a neutral working directory keep the caller's folder off the import path;
LABEL only names the process for ``ps``. Workers (``runtime/worker.py``) and engine cores
(``engine/core.py``) are both started here, and both leave when their parent does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from shardserve.runtime.messages import decode, encode


class Pipes:
    """Two pipes, one each way, carrying typed messages."""

    def __init__(self, conn_in: Connection, conn_out: Connection) -> None:
        self.conn_in, self.conn_out = conn_in, conn_out

    def send(self, msg: Any) -> None:
        """Raises ``OSError`` when the other side is gone."""
        self.conn_out.send_bytes(encode(msg))

    def send_encoded(self, data: bytes) -> None:
        """A message ``encode`` made once for several receivers."""
        self.conn_out.send_bytes(data)

    def recv(self) -> Any:
        """Raises ``EOFError`` (or ``OSError``) when the other side is gone."""
        return decode(self.conn_in.recv_bytes())


class Child(Pipes):
    def __init__(self, module: str, label: str, env: dict[str, str] | None = None) -> None:
        child_in, self_out = os.pipe()
        self_in, child_out = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", module, str(child_in), str(child_out), label],
            pass_fds=(child_in, child_out), env=env, stdin=subprocess.DEVNULL, cwd="/")
        os.close(child_in)
        os.close(child_out)
        super().__init__(Connection(self_in, writable=False),
                         Connection(self_out, readable=False))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        try:
            return self.proc.wait(timeout=wait_s) if wait_s else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def reap(self, timeout_s: float = 10.0) -> None:
        """Wait for the process (killing it after ``timeout_s``) and close the pipes."""
        if self.exit_code(timeout_s) is None:
            self.kill()
            self.proc.wait()
        for c in (self.conn_in, self.conn_out):
            c.close()


def serve_pipes() -> Pipes:
    """In the child: its two pipes (from argv), after starting to watch its parent."""
    die_with_parent()
    return Pipes(Connection(int(sys.argv[1]), writable=False),
                 Connection(int(sys.argv[2]), readable=False))


def die_with_parent() -> None:
    """Exit when the parent process does. (Not PR_SET_PDEATHSIG: it fires when the parent
    *thread* that spawned us exits, and the server spawns from pool threads.)"""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
