"""The HTTP layer on raw sockets, as a reliability probe found it (issue 37): limits per pipelined request, answers
that are not lost for a later request's fault, a 413 that closes, SSE framing for HTTP/1.0 and `Connection: close`,
505 for other versions, and health probes answered at the connection cap; every answer JSON with nosniff."""

from __future__ import annotations

import json
import socket
import time

import pytest

CAP = 6  # DUALRATE_MAX_CONNECTIONS of this module's server


@pytest.fixture(scope="module")
def wire(start_server):
    return start_server(max_connections=CAP, max_active_images=2, max_images_per_request=1, warmup="false")


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
    s.settimeout(15)
    return s


def read_all(s: socket.socket, until_close: bool = True, limit_s: float = 15.0) -> bytes:
    out, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        out += chunk
        if not until_close and out.count(b"\r\n\r\n") and b"content-length" in out.lower():
            head, _, body = out.partition(b"\r\n\r\n")
            n = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")))
            if len(body) >= n:
                break
    return out


def responses(raw: bytes) -> list[tuple[int, dict[str, list[str]], bytes]]:
    """Split a byte stream of Content-Length answers into (status, headers, body)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        n = int(headers.get("content-length", ["0"])[0])
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        raw = rest[n:]
    return out


def error_shape(status: int, headers: dict, body: bytes, kind: str) -> None:
    assert headers["content-type"][0].startswith("application/json"), headers
    assert headers["x-content-type-options"] == ["nosniff"], headers
    assert json.loads(body)["error"] == kind, body


def test_a_pipelined_request_is_held_to_the_header_limit_and_the_one_before_it_is_answered(wire):
    s = connect(wire)
    s.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n"
              b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
    got = responses(read_all(s))
    assert [g[0] for g in got] == [200, 431], got  # before: 200, 200 (the second head was never counted)
    error_shape(*got[1], kind="header_fields_too_large")


def test_a_post_is_answered_before_a_pipelined_request_with_too_many_headers_is_refused(wire):
    body = json.dumps({"class_label": 1, "steps": 4, "encoder_interval": 2, "seed": 3}).encode()
    post = (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body) + body)
    many = b"GET /health/live HTTP/1.1\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(101)) + b"\r\n"
    s = connect(wire)
    s.sendall(post + many)
    got = responses(read_all(s))
    assert [g[0] for g in got] == [200, 431], [g[:2] for g in got]  # before: only the 431 came back
    assert len(json.loads(got[0][2])["images"]) == 1


def test_a_413_closes_the_connection_instead_of_reading_on(wire):
    s = connect(wire)
    s.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked"
              b"\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (60_000, b" " * 60_000)
    answer, t0, closed = b"", time.monotonic(), False
    s.settimeout(0.05)
    while time.monotonic() - t0 < 10:
        try:
            s.sendall(chunk)
        except OSError:
            closed = True
            break
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            closed = True
            break
        if not data:
            closed = True
            break
        answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert closed and time.monotonic() - t0 < 5, "the server went on reading the body after its 413"


def test_sse_framing_with_connection_close_and_over_http_1_0(wire):
    body = json.dumps({"class_label": 2, "steps": 4, "encoder_interval": 2, "seed": 1, "preview_every": 2}).encode()
    for version, extra in ((b"1.1", b"connection: close\r\n"), (b"1.0", b"")):
        s = connect(wire)
        s.sendall(b"POST /generate/stream HTTP/" + version + b"\r\nhost: x\r\ncontent-type: application/json\r\n" + extra
                  + b"content-length: %d\r\n\r\n" % len(body) + body)
        raw = read_all(s)
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = [line.lower() for line in head.split(b"\r\n")[1:]]
        assert [line for line in lines if line.startswith(b"connection:")] == [b"connection: close"], head
        if version == b"1.0":
            assert not any(line.startswith(b"transfer-encoding") for line in lines), head  # 1.0 has no chunked
            assert rest.startswith(b"event: queued") and b"event: done" in rest, rest[:200]
        else:
            assert b"event: done" in rest


@pytest.mark.parametrize("line", [b"GET /health/live HTTP/2.0", b"GET /health/live HTTP/1.2", b"GET /health/live"])
def test_http_versions_other_than_1_0_and_1_1_get_505(wire, line):
    s = connect(wire)
    s.sendall(line + b"\r\nhost: x\r\n\r\n")
    got = responses(read_all(s))
    assert got[0][0] == 505, got
    error_shape(*got[0], kind="http_version_not_supported")


def test_an_unparsable_request_gets_the_documented_400(wire):
    s = connect(wire)
    s.sendall(b"GET /health/live HTTP/1.1\r\nbad header line\r\n\r\n")
    got = responses(read_all(s))
    assert got[0][0] == 400, got  # before: text/plain "Invalid HTTP request received." without nosniff
    error_shape(*got[0], kind="invalid_request")


def test_health_probes_are_answered_at_the_connection_cap_and_the_rest_get_json_503(wire):
    idle = [connect(wire) for _ in range(CAP)]
    try:
        time.sleep(0.3)
        s = connect(wire)
        s.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        live = responses(read_all(s, until_close=False))
        assert live[0][0] == 200, live  # before: 503, and a liveness probe restarted a healthy service
        s = connect(wire)
        s.sendall(b"GET /v1/model HTTP/1.1\r\nhost: x\r\n\r\n")
        other = responses(read_all(s))
        assert other[0][0] == 503, other
        error_shape(*other[0], kind="unavailable")
        assert other[0][1]["retry-after"] == ["1"]
    finally:
        for c in idle:
            c.close()
