"""uvicorn's httptools protocol with bounds on what a client can make the server hold before the app sees a request.

uvicorn (0.3x) has no limit on the size of a request's head with httptools, which buffers a header until its end (a
10 MiB header line held ~11 MB of memory per connection, a 32 MiB header got a 200), and no timeout for a head or a
body that arrive slowly (a header line every 2 s kept a connection open for ever). This subclass adds, per connection:

- the request line and headers together at most `max_header_bytes` (431 otherwise, connection closed), and at most
  `max_headers` headers (431);
- the head complete within `header_timeout_s` of the connection's first byte or of the previous response, and the
  body within `body_timeout_s` of the head (408, connection closed);

- the limits per request, pipelined ones included: a request that breaks one is refused (431) after the answers of
  the requests before it on the connection have gone out, never instead of them;
- HTTP/1.0 and 1.1 only (505 otherwise); an HTTP/1.0 answer without a Content-Length (a stream) is sent as it is and
  ends when the connection closes (HTTP/1.0 has no chunked encoding);
- uvicorn's `limit_concurrency` caps the open connections and requests in flight (503 beyond), but /health/* probes
  are answered up to HEALTH_RESERVE beyond the cap, so a liveness probe does not restart a service that is only busy;
- every answer of this layer (400, 408, 431, 503, 505) in the documented JSON error body with nosniff.

All are settings (DUALRATE_MAX_HEADER_BYTES, ..., DUALRATE_MAX_CONNECTIONS), with the body cap (DUALRATE_MAX_BODY_BYTES)
in service.middleware.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("service.http")

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
           503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}
VERSION = re.compile(rb"[A-Z]+ [^ \r\n]+ HTTP/(\d+\.\d+)\r\n")  # a request line's version
HEALTH_RESERVE = 64  # /health/* probes answered beyond the connection cap, up to this many more


def _answer(status: int, kind: str, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": kind, "message": message}).encode()
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]), b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"x-content-type-options: nosniff\r\n", extra,
                     b"connection: close\r\n\r\n", body])


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """What a request beyond DUALRATE_MAX_CONNECTIONS gets (uvicorn's own is plain text)."""
    body = json.dumps({"error": "unavailable", "message": "too many open connections (DUALRATE_MAX_CONNECTIONS); retry "
                       "shortly"}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"), (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Http10Cycle(RequestResponseCycle):
    """An HTTP/1.0 request's cycle: an answer without Content-Length (a stream) goes out without chunked encoding,
    which HTTP/1.0 lacks, and ends when the connection closes."""

    _raw = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {n.lower() for n, _ in message.get("headers", [])}
            if not names & {b"content-length", b"transfer-encoding"} and self.scope["method"] != "HEAD":
                self._raw, self.keep_alive = True, False
                self.chunked_encoding, self.expected_content_length = False, 1 << 62  # no framing: raw bytes
        elif self._raw and message["type"] == "http.response.body" and not message.get("more_body", False):
            if message.get("body"):
                await super().send({"type": "http.response.body", "body": message["body"], "more_body": True})
            if not self.response_complete:
                self.response_complete = True
                self.message_event.set()
                self.transport.close()  # the end of the body
                self.on_response()
            return
        await super().send(message)


class BoundedHttpTools(HttpToolsProtocol):
    max_header_bytes = 32_768
    max_headers = 100
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # the current request's head, counted by the parser's callbacks
        self._head_raw = 0  # bytes received since the current head started
        self._in_head = True
        self._header_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._deferred: bytes | None = None  # a refusal waiting for the answers of the requests before it

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

    def _refuse(self, message: str, status: int = 431, kind: str = "header_fields_too_large") -> None:
        """Answer `status` and close; after the answers of the earlier requests on this connection, if any are still
        being made (pipelining): they are not lost for a later request's fault."""
        self._disarm()
        self._refused = True
        log.info("refusing a request from %s: %s", self.client, message)
        answer = _answer(status, kind, message)
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self._deferred = answer
            self.flow.pause_reading()
        else:
            self.transport.write(answer)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._refuse(f"{msg.rstrip('.')}: not an HTTP/1.x request this server can parse", 400, "invalid_request")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None and not self.pipeline and (self.cycle is None or self.cycle.response_complete):
            if not self.transport.is_closing():
                self.transport.write(self._deferred)
                self.transport.close()
            self._deferred = None

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
            if self._head_raw == 0 and (m := VERSION.match(data)) and m.group(1) not in (b"1.0", b"1.1"):
                self._refuse(f"HTTP/{m.group(1).decode()} is not served here: send HTTP/1.1 (or 1.0)", 505,
                             "http_version_not_supported")  # the parser would call 1.2 or 3.0 a syntax error
                return
            # The head's raw bytes (the parser buffers an unterminated header line whole: it must not get far).
            end = data.find(b"\r\n\r\n")
            self._head_raw += len(data) if end < 0 else end + 4
            if self._head_raw > self.max_header_bytes:
                self._head_too_large()
                return
        super().data_received(data)

    def _head_too_large(self) -> None:
        self._refuse(f"the request line and headers exceed {self.max_header_bytes} bytes (DUALRATE_MAX_HEADER_BYTES)")

    # Per request, counted by the parser's callbacks: a pipelined request's head is held to the limits too.
    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._head_bytes, self._header_count = 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._head_bytes += len(url) + 16  # method, version, separators
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large()
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_count += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            self._refuse(f"more than {self.max_headers} headers (DUALRATE_MAX_HEADERS)")
            return
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large()
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._refuse(f"HTTP/{version} is not served here: send HTTP/1.1 (or 1.0)", 505, "http_version_not_supported")
            return
        self._in_head = False
        self._arm(self.body_timeout_s, "request body")
        path = self.url.split(b"?", 1)[0]
        cap = self.limit_concurrency
        over = cap is not None and (len(self.connections) >= cap or len(self.tasks) >= cap)
        if over and path.startswith(b"/health/") and cap is not None and len(self.tasks) < cap + HEALTH_RESERVE:
            over = False  # probes have an allowance of their own beyond the cap
        saved_app = self.app
        self.limit_concurrency = None  # decided here
        if over:
            log.warning("%s: over DUALRATE_MAX_CONNECTIONS (%s): 503", self.client, cap)
            self.app = _over_capacity
        try:
            super().on_headers_complete()
        finally:
            self.app, self.limit_concurrency = saved_app, cap
        if version == "1.0" and self.cycle is not None:
            self.cycle.__class__ = Http10Cycle

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()
        # The next request on this connection starts its own head (its timer starts with its first byte).
        self._in_head, self._head_bytes, self._head_raw, self._header_count = True, 0, 0, 0


def bounded_protocol(max_header_bytes: int, max_headers: int, header_timeout_s: float,
                     body_timeout_s: float) -> type[BoundedHttpTools]:
    """A protocol class with these limits (uvicorn instantiates the class itself, per connection)."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {
        "max_header_bytes": max_header_bytes, "max_headers": max_headers, "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s})
