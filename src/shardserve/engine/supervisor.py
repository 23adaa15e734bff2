"""Supervision of one replica's engine: started by a factory, health-checked while it runs,
and started again, with backoff, after its worker group fails.

Note on the algorithm: ``start`` builds the first engine (its failure is the load's failure).
A monitor thread then checks the group every ``health_check_s`` (every rank alive and
answering a ping, skipped while a step runs: steps have their own deadline). Whoever sees the
group fail (the monitor, or the thread that drives the engine and got a ``WorkerError``) calls
``fail``: the engine is dropped (its workers killed), the state turns RESTARTING, and the
monitor builds a new engine after a backoff that doubles with each consecutive failure. A
failure counts as consecutive unless the engine had run ``stable_s``; after ``max_restarts``
consecutive failures the state is FAILED, the reason kept, and nothing is tried again until
the model is loaded anew. Readers see ``engine`` (None unless READY), ``state`` and
``reason``; nothing else of the engine is touched from the monitor.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class State(enum.Enum):
    READY = "READY"
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


class Supervised(Protocol):
    def check_health(self, timeout_s: float) -> None: ...
    def shutdown(self, kill: bool = False) -> None: ...


E = TypeVar("E", bound=Supervised)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    """Consecutive failures (a start that fails, or a group that dies before ``stable_s``)
    after which the replica stays FAILED."""
    backoff_s: float = 0.5
    """Wait before the first restart; doubles with each consecutive failure."""
    max_backoff_s: float = 30.0
    stable_s: float = 60.0
    """An engine that ran this long before failing starts the count afresh."""
    health_check_s: float = 2.0
    """How often a running group is checked: every rank alive and answering a ping."""
    ping_timeout_s: float = 10.0


@dataclass
class Status:
    state: State
    reason: str | None = None  # the last failure, in one line
    restarts: int = 0  # engines started after the first
    since: float = field(default_factory=time.time)  # when the state last changed


class Supervisor(Generic[E]):
    def __init__(self, name: str, factory: Callable[[], E], policy: RestartPolicy) -> None:
        self.name, self.factory, self.policy = name, factory, policy
        self.engine: E | None = None
        self.status = Status(State.RESTARTING)
        self._failures = 0  # consecutive
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> State:
        return self.status.state

    def start(self) -> E:
        """Build the first engine (raising what the factory raises) and start watching."""
        engine = self.factory()
        with self._lock:
            self._ready(engine)
        self._thread = threading.Thread(target=self._monitor, name=f"supervise-{self.name}",
                                        daemon=True)
        self._thread.start()
        return engine

    def fail(self, engine: E | None, error: BaseException) -> None:
        """``engine``'s group failed: drop it and restart. A stale engine (already replaced,
        or reported twice) is ignored."""
        with self._lock:
            if engine is None or engine is not self.engine or self._closed:
                return
            self.engine = None
            stable = time.monotonic() - self._started_at >= self.policy.stable_s
            self._failures = 1 if stable else self._failures + 1
            if self._failures > self.policy.max_restarts:
                self._set(State.FAILED, f"gave up after {self.policy.max_restarts} restarts "
                                        f"that failed soon; last: {one_line(error)}")
            else:
                self._set(State.RESTARTING, one_line(error))
        log.warning("%s: workers failed (%s); %s", self.name, one_line(error),
                    self.state.value.lower())
        _shutdown(engine, kill=True)
        self._wake.set()

    def close(self) -> None:
        """Stop watching and restarting, and shut the engine down (gracefully)."""
        with self._lock:
            self._closed = True
            engine, self.engine = self.engine, None
            self._set(State.UNLOADING, self.status.reason)
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if engine is not None:
            _shutdown(engine, kill=False)

    # -- the monitor thread ----------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._closed:
            state = self.state
            if state is State.READY:
                self._wait(self.policy.health_check_s)
                self._check()
            elif state is State.RESTARTING:
                self._wait(min(self.policy.backoff_s * 2 ** (self._failures - 1),
                               self.policy.max_backoff_s))
                self._restart()
            else:
                self._wait(None)

    def _wait(self, seconds: float | None) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _check(self) -> None:
        engine = self.engine
        if engine is None or self._closed:
            return
        try:
            engine.check_health(self.policy.ping_timeout_s)
        except Exception as e:
            self.fail(engine, e)

    def _restart(self) -> None:
        if self._closed:
            return
        try:
            engine = self.factory()
        except Exception as e:
            log.warning("%s: restart %d failed: %s", self.name, self._failures, one_line(e))
            with self._lock:
                self._failures += 1
                gave_up = self._failures > self.policy.max_restarts
                if not self._closed:
                    self._set(State.FAILED if gave_up else State.RESTARTING,
                              one_line(e) if not gave_up else
                              f"gave up after {self.policy.max_restarts} failed restarts; "
                              f"last: {one_line(e)}")
            return
        with self._lock:
            if self._closed:
                engine_to_drop = engine
            else:
                engine_to_drop = None
                self.status.restarts += 1
                self._ready(engine)
        if engine_to_drop is not None:
            _shutdown(engine_to_drop, kill=False)
        else:
            log.warning("%s: restarted (restart %d)", self.name, self.status.restarts)

    def _ready(self, engine: E) -> None:
        self.engine, self._started_at = engine, time.monotonic()
        self._set(State.READY, self.status.reason)

    def _set(self, state: State, reason: str | None) -> None:
        self.status.state, self.status.reason, self.status.since = state, reason, time.time()


def _shutdown(engine: Supervised, kill: bool) -> None:
    try:
        engine.shutdown(kill=kill)
    except Exception:
        log.exception("shutting down an engine failed")


def one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text[:300]
