"""The HTTP/1.1 connection protocol the server runs: uvicorn's h11 protocol, with limits that
keep slow or abusive clients from holding connections (and file descriptors) forever.

- A connection that has not sent a complete request head ``header_timeout_s`` after it opened
  (or after its previous response, on keep-alive) is closed: a client trickling header bytes
  (slowloris) holds a socket for that long at most. Slow bodies are the request guard's
  (``body_timeout_s``, 408).
- At most ``max_connections`` connections are open at once; one more is closed on arrival.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""

    class LimitedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("over %d connections: closing a new one", max_connections)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # a new request begins on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return LimitedH11Protocol
