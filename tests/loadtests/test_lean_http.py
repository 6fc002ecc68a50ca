"""loadtests.lean_http against a loopback socket that answers with fixed bytes: keep-alive, a reconnect when the
server closed the socket, and a clear error for what it does not read."""

from __future__ import annotations

import asyncio
import json

import pytest

from loadtests.lean_http import LeanConnection, LeanHTTPError


def serve(answers: list[bytes], close_after: int | None = None):
    """A server that reads one request per answer (head + Content-Length body) and writes the next answer;
    -> (start coroutine, list of (connection number, request body))."""
    seen: list[tuple[int, dict]] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        me, served = connections, 0
        while answers:
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
            except asyncio.IncompleteReadError:
                break
            length = int(next(ln.split(":")[1] for ln in head.split("\r\n") if ln.lower().startswith("content-length")))
            seen.append((me, json.loads(await reader.readexactly(length))))
            writer.write(answers.pop(0))
            await writer.drain()
            served += 1
            if close_after is not None and served == close_after:
                break
        writer.close()

    return handle, seen


def answer(status: int, payload: dict, extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_requests_share_one_socket_and_a_closed_one_is_reopened():
    async def run():
        handle, seen = serve([answer(200, {"images": [1]}), answer(429, {"error": "full"}), answer(200, {"images": []})],
                             close_after=2)
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = LeanConnection(f"http://127.0.0.1:{port}")
        got = [await conn.post_json("/generate", {"n": i}) for i in range(3)]
        await conn.close()
        server.close()
        return got, seen

    got, seen = asyncio.run(run())
    assert got == [(200, {"images": [1]}), (429, {"error": "full"}), (200, {"images": []})]
    assert seen == [(1, {"n": 0}), (1, {"n": 1}), (2, {"n": 2})]  # the third on a new socket, sent once


def test_a_body_without_content_length_is_an_error_not_a_guess():
    async def run():
        handle, _ = serve([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"])
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        conn = LeanConnection(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            with pytest.raises(LeanHTTPError, match="without Content-Length"):
                await conn.post_json("/generate", {})
        finally:
            await conn.close()
            server.close()

    asyncio.run(run())
    with pytest.raises(ValueError, match="only http"):
        LeanConnection("https://example.invalid")
