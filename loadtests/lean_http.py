"""A lean HTTP/1.1 load-generator connection: one keep-alive socket, JSON POSTs, Content-Length bodies only.

On a two-core machine the load generator shares the cores with the service it measures; httpx spent ~3 ms of CPU
per request there (docs/cpu_backends.md). This client does only what a closed loop needs (write a request, read the
status line, the headers and a Content-Length body) so that less of the machine goes to the measuring side. It is
not a general client: no chunked bodies, redirects, TLS or proxies; a response it cannot read is an error, not a
guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit


class LeanHTTPError(RuntimeError):
    pass


class LeanConnection:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: only http://host:port URLs")
        self.host, self.port = parts.hostname, parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        """-> (status, the decoded JSON body). Reconnects once when the server closed the kept-alive socket."""
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for attempt in (0, 1):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            try:
                self._writer.write(head + body)
                await self._writer.drain()
                return await self._response(self._reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise LeanHTTPError(f"not an HTTP status line: {lines[0]!r}") from None
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" not in headers:
            raise LeanHTTPError(f"status {status}: a response without Content-Length (this client reads no other)")
        data = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, json.loads(data) if data else None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
