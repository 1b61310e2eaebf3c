"""uvicorn's HTTP/1.1 protocol (h11) with the read deadlines it lacks.

uvicorn bounds the idle time between requests (keep-alive), but nothing else on the way in:
a client that sends one header line, or one body byte, every few seconds holds its
connection (and a task, and memory) for as long as it likes, and the API key is checked
only after the headers. nginx has ``client_header_timeout`` and ``client_body_timeout`` for
this; here:

- the headers of each request must arrive within ``header_timeout`` seconds of its first
  byte (of the connection, for the first request);
- once a body has been arriving for ``BODY_GRACE`` seconds, it must keep an average of
  ``BODY_MIN_RATE`` bytes a second (time spent with reading paused, while the app digests
  what came, does not count): a multi-GB upload at disk speed passes, a trickle does not.

Either way the client gets a 408 (where no response has started) and the connection closes.
Concurrent connections are bounded by uvicorn's ``limit_concurrency`` (a 503 past it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

BODY_GRACE = 30.0
BODY_MIN_RATE = 16 << 10
CHECK_EVERY = 2.0
_BODY = b'{"error":"request read timed out"}'
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


class GuardedProtocol(H11Protocol):
    """H11Protocol with header and body read deadlines (module doc). ``header_timeout`` is
    set on the class by :func:`protocol_class`."""

    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_since = 0.0
        self._body_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        between = cycle is None or cycle.response_complete
        if between and self._headers_timer is None:
            self._arm_headers()  # the first byte of the next request on a kept-alive connection
        if not between and cycle.more_body:
            self._body_bytes += len(data)
        super().data_received(data)
        if self.cycle is not cycle:  # the headers of a new request are in
            self._cancel_headers()
            if self.cycle is not None and self.cycle.more_body and self._body_timer is None:
                self._body_since, self._body_bytes = time.monotonic(), 0
                self._body_timer = self.loop.call_later(CHECK_EVERY, self._check_body)

    # ----------------------------------------------------------------- deadlines

    def _arm_headers(self) -> None:
        self._cancel_headers()
        self._headers_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_headers(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_headers()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_late(self) -> None:
        self._headers_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return
        log.info("closing a connection whose request headers took over %.0f s", self.header_timeout)
        self._close(send=True)

    def _check_body(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        now = time.monotonic()
        if self.flow.read_paused:  # the app is behind, not the client
            self._body_since, self._body_bytes = now, 0
        elif now - self._body_since > BODY_GRACE and (
            self._body_bytes / (now - self._body_since) < BODY_MIN_RATE
        ):
            log.info("closing a connection whose request body trickled in")
            self._close(send=not cycle.response_started)
            return
        self._body_timer = self.loop.call_later(CHECK_EVERY, self._check_body)

    def _close(self, *, send: bool) -> None:
        if send:
            self.transport.write(TIMEOUT_RESPONSE)
        self._cancel_timers()
        self.transport.close()


def protocol_class(header_timeout: float) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout": header_timeout})
