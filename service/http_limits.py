"""uvicorn's httptools protocol with bounds on what a client can make the server hold before the app sees a request.

uvicorn (0.3x) has no limit on the size of a request's head with httptools, which buffers a header until its end (a
10 MiB header line held ~11 MB of memory per connection, a 32 MiB header got a 200), and no timeout for a head or a
body that arrive slowly (a header line every 2 s kept a connection open for ever). This subclass adds, per connection:

- the request line and headers together at most `max_header_bytes` (431 otherwise, connection closed), and at most
  `max_headers` headers (431);
- the head complete within `header_timeout_s` of the connection's first byte or of the previous response, and the
  body within `body_timeout_s` of the head (408, connection closed);

uvicorn's own `limit_concurrency` caps the open connections (503 beyond). All are settings (DUALRATE_MAX_HEADER_BYTES,
..., DUALRATE_MAX_CONNECTIONS), with the body cap (DUALRATE_MAX_BODY_BYTES) in service.app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("service.http")

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _answer(status: int, kind: str, message: str) -> bytes:
    body = json.dumps({"error": kind, "message": message}).encode()
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]), b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"x-content-type-options: nosniff\r\n",
                     b"connection: close\r\n\r\n", body])


class BoundedHttpTools(HttpToolsProtocol):
    max_header_bytes = 32_768
    max_headers = 100
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._header_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ---- timers --------------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and getattr(self.cycle, "response_started", False)
        log.info("closing a connection from %s: its %s did not arrive in time", self.client, what)
        if not started:
            limit = self.header_timeout_s if what == "request head" else self.body_timeout_s
            self.transport.write(_answer(408, "request_timeout", f"the {what} did not arrive within {limit:g} s"))
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self._refused = True
        self.transport.close()

    def _refuse(self, message: str) -> None:
        self._disarm()
        self._refused = True
        log.info("refusing a request from %s: %s", self.client, message)
        self.transport.write(_answer(431, "header_fields_too_large", message))
        self.transport.close()

    # ---- uvicorn's callbacks ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "request head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._timer is None:
                self._arm(self.header_timeout_s, "request head")
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > self.max_header_bytes:
                self._refuse(f"the request line and headers exceed {self.max_header_bytes} bytes "
                             "(DUALRATE_MAX_HEADER_BYTES)")
                return
        super().data_received(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            if not self._refused:
                self._refuse(f"more than {self.max_headers} headers (DUALRATE_MAX_HEADERS)")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._arm(self.body_timeout_s, "request body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()
        # The next request on this connection starts its own head (its timer starts with its first byte).
        self._in_head, self._head_bytes, self._header_count = True, 0, 0


def bounded_protocol(max_header_bytes: int, max_headers: int, header_timeout_s: float,
                     body_timeout_s: float) -> type[BoundedHttpTools]:
    """A protocol class with these limits (uvicorn instantiates the class itself, per connection)."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {
        "max_header_bytes": max_header_bytes, "max_headers": max_headers, "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s})
