"""Issue 21's defects, each against a real server on loopback: bounded request heads, slow heads and bodies timed
out, a cap on connections, honest body errors, the API key before the body, the schema carrying the live limits
(checked by schemathesis over the whole published schema), small requests under overload, settings that contradict
the model card, and the small hardening (no Host-built redirect, nosniff, a minimum deadline)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from dualrate.init import init_checkpoint
from loadtests.process import metric
from service.settings import Settings
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # real servers


def exchange(port: int, data: bytes, chunk: int = 65_536, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send `data` (as far as the server lets us), then read until the server closes. -> (answer, closed)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(wait)
    try:
        for i in range(0, len(data), chunk):
            s.sendall(data[i : i + chunk])
    except OSError:
        pass  # the server closed the connection while we were still sending: what a limit should do
    out, closed = b"", False
    try:
        while True:
            part = s.recv(65_536)
            if not part:
                closed = True
                break
            out += part
    except (TimeoutError, ConnectionResetError):
        closed = isinstance(out, bytes) and out.startswith(b"HTTP/1.1 4")
    s.close()
    return out, closed


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def bounded(start_server):
    return start_server(header_timeout_s=1.0, body_timeout_s=1.0, max_active_images=4, max_images_per_request=2)


def port_of(srv) -> int:
    return int(srv.url.rsplit(":", 1)[1])


# ---- 1. heads, timeouts, connections -------------------------------------------------------------------------------


def test_an_oversized_head_gets_431_and_the_connection_closes(bounded):
    answer, closed = exchange(port_of(bounded), b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"DUALRATE_MAX_HEADER_BYTES" in answer and closed


def test_ten_huge_unfinished_heads_do_not_grow_the_server(bounded):
    before = rss_kb(bounded.proc.pid)
    answers = [exchange(port_of(bounded), b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (10 << 20))[0]
               for _ in range(10)]
    assert all(a.startswith(b"HTTP/1.1 431") for a in answers)
    assert rss_kb(bounded.proc.pid) - before < 20_000  # KB: before the limit, ~110 MB for ten of them


def test_too_many_headers_get_431(bounded):
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    answer, _ = exchange(port_of(bounded), head)
    assert answer.startswith(b"HTTP/1.1 431") and b"DUALRATE_MAX_HEADERS" in answer


def test_a_head_sent_a_line_at_a_time_is_timed_out(bounded):
    s = socket.create_connection(("127.0.0.1", port_of(bounded)))
    s.settimeout(10)
    t0 = time.monotonic()
    s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    try:
        for i in range(30):  # one header line every 0.3 s, never the blank line that ends the head
            s.sendall(b"X-Slow-%d: 1\r\n" % i)
            time.sleep(0.3)
    except OSError:
        pass
    try:
        while part := s.recv(4096):
            answer += part
    except OSError:
        pass
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 4  # the timeout is 1 s; 30 lines would have taken 9 s


def test_a_body_that_stalls_is_timed_out(bounded):
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"steps": 4')
    t0 = time.monotonic()
    answer, closed = exchange(port_of(bounded), head, wait=10)
    assert answer.startswith(b"HTTP/1.1 408") and closed, answer[:200]
    assert time.monotonic() - t0 < 5


def test_connections_beyond_the_cap_get_503(start_server):
    srv = start_server(max_connections=2)
    held = [socket.create_connection(("127.0.0.1", port_of(srv))) for _ in range(2)]
    for s in held:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # open, head unfinished
    time.sleep(0.3)
    beyond = httpx.get(f"{srv.url}/v1/model")
    assert beyond.status_code == 503 and beyond.json()["error"] == "unavailable"
    assert httpx.get(f"{srv.url}/health/live").status_code == 200  # probes have places of their own (test_wire)
    for s in held:
        s.close()
    time.sleep(0.3)
    assert httpx.get(f"{srv.url}/v1/model").status_code == 200


# ---- 4, 6, 7, 8: contract, body errors, keys, small hardening ------------------------------------------------------


def test_the_schema_carries_the_live_limits_and_every_status(bounded):
    schema = httpx.get(f"{bounded.url}/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]

    def maximum(name: str) -> float:
        return next(v["maximum"] for v in props[name].get("anyOf", [props[name]]) if "maximum" in v)

    assert maximum("num_images") == 2 and maximum("steps") == 256 and maximum("encoder_interval") == 256
    assert maximum("timeout_s") == 600 and maximum("class_label") == 9
    statuses = set(schema["paths"]["/generate"]["post"]["responses"])
    assert {"200", "400", "401", "408", "413", "415", "422", "429", "431", "500", "503", "504"} <= statuses
    over = httpx.post(f"{bounded.url}/generate", json={"class_label": 1, "timeout_s": 601})
    assert over.status_code == 422 and over.json()["details"][0]["field"] == "timeout_s"


@pytest.mark.parametrize(("body", "needle"), [
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"seed": ' + b"9" * 20_000 + b"}", "seed: a number of 20000 digits"),
    ('{"class_label": 1}'.encode("utf-16"), "not UTF-8"),
])
def test_body_errors_name_their_reason(start_server, body, needle):
    srv = start_server(max_body_bytes=65_536)
    r = httpx.post(f"{srv.url}/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["message"]


def test_the_api_key_is_checked_before_the_body_and_the_scheme_is_case_insensitive(start_server):
    srv = start_server(api_keys="k1")
    bad_body = httpx.post(f"{srv.url}/generate", content=b"{nope", headers={"content-type": "application/json"})
    assert bad_body.status_code == 401
    ok = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 2, "encoder_interval": 2},
                    headers={"authorization": "bearer k1"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_a_blank_api_key_setting_is_refused(monkeypatch):
    monkeypatch.setenv("DUALRATE_API_KEYS", "  ")
    with pytest.raises(ValidationError, match="blank"):
        Settings()


@pytest.mark.parametrize("value", [",", " , ", "[]", '[""]', ",,,"])
def test_an_api_key_setting_that_parses_to_no_key_is_refused(monkeypatch, value):
    """A compose line `${A},${B}` with both unset gives ",": before, zero keys and an open API."""
    monkeypatch.setenv("DUALRATE_API_KEYS", value)
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()


@pytest.mark.parametrize(("host", "beyond"), [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                              ("127.0.0.2", False), ("0.0.0.0", True), ("::", True),
                                              ("10.1.2.3", True), ("dualrate.internal", True)])
def test_listens_beyond_loopback(monkeypatch, host, beyond):
    monkeypatch.setenv("DUALRATE_HOST", host)
    assert Settings().listens_beyond_loopback is beyond


def test_a_service_on_every_interface_without_keys_warns_at_start(start_server):
    srv = start_server(host="0.0.0.0", warmup="false")
    line = next(x for x in srv.log().splitlines() if "API keys" in x)
    assert "WARNING" in line and "0.0.0.0" in line and "DUALRATE_API_KEYS" in line, line


def test_max_steps_below_the_card_default_is_refused(monkeypatch):
    monkeypatch.setenv("DUALRATE_MAX_STEPS", "8")
    with pytest.raises(ValidationError, match="DUALRATE_MAX_STEPS >= 32"):
        Settings()


def test_no_redirect_from_the_host_header_nosniff_and_a_minimum_deadline(bounded):
    r = httpx.get(f"{bounded.url}/static", headers={"host": "evil.example"})
    assert "evil.example" not in r.headers.get("location", "")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{bounded.url}/health/live").headers["x-content-type-options"] == "nosniff"
    tiny = httpx.post(f"{bounded.url}/generate", json={"class_label": 1, "timeout_s": 5e-324})
    assert tiny.status_code == 422 and tiny.json()["details"][0]["field"] == "timeout_s"


# ---- 2: small requests under overload ------------------------------------------------------------------------------


def test_small_requests_are_served_under_a_flood_of_large_ones(start_server):
    """8 slots, a queue of 8, 48 clients looping 2-image 128-step requests; a 1-image 8-step request every second
    for 15 s. Before: 429 every time (the queue was always full of large requests)."""
    srv = start_server(max_active_images=8, max_images_per_request=2, queue_size=8, max_steps=256)
    large = {"class_label": 3, "num_images": 2, "steps": 128, "encoder_interval": 4}
    small = {"class_label": 5, "num_images": 1, "steps": 8, "encoder_interval": 4}

    async def run() -> tuple[list[int], list[float]]:
        stop = time.monotonic() + 15
        codes: list[int] = []
        active: list[float] = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=None)) as c:
            async def flood() -> None:
                while time.monotonic() < stop:
                    r = await c.post("/generate", json=large)
                    if r.status_code == 429:
                        await asyncio.sleep(0.2)

            async def probe() -> None:
                await asyncio.sleep(3)  # the flood fills slots and queue first
                while time.monotonic() < stop:
                    r = await c.post("/generate", json=small)
                    codes.append(r.status_code)
                    active.append(metric((await c.get("/metrics")).text, "dualrate_active_images"))
                    await asyncio.sleep(1)

            await asyncio.gather(probe(), *[flood() for _ in range(48)])
        return codes, active

    codes, active = asyncio.run(run())
    assert codes and set(codes) == {200}, codes
    assert sum(a >= 7 for a in active) >= len(active) - 1, active  # the slots stay (nearly) full


# ---- the whole schema, fuzzed ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cheap_checkpoint(tmp_path_factory) -> Path:
    """A tiny model whose card defaults to 4 steps: thousands of generated requests in about a minute."""
    ck = init_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny")
    card = json.loads((ck / "model_card.json").read_text())
    card["defaults"]["steps"] = 4
    (ck / "model_card.json").write_text(json.dumps(card))
    return ck


def test_schemathesis_finds_nothing_over_the_published_schema(start_server, cheap_checkpoint, tmp_path):
    # max_steps at the card's 4: the schema publishes it, so every generated request is the cheapest the model serves.
    srv = start_server(checkpoint=cheap_checkpoint, max_steps=4, max_images_per_request=2, max_active_images=4,
                       queue_size=1000)
    out = subprocess.run([str(Path(ROOT) / ".venv/bin/schemathesis") if (Path(ROOT) / ".venv/bin/schemathesis").exists()
                          else "schemathesis", "run", f"{srv.url}/openapi.json", "--checks", "all", "-n", "1000",
                          # use_after_free: DELETE /v1/jobs/{id} cancels a job, whose record stays readable (status
                          # cancelled) until DUALRATE_JOB_TTL_S, as docs/jobs.md says; the check wants a 404 after it.
                          "--exclude-checks", "not_a_server_error,use_after_free", "--generation-deterministic",
                          "-w", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    m = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert out.returncode == 0 and m, out.stdout[-5000:]
    assert int(m.group(1)) >= 2000 and m.group(1) == m.group(2), m.group(0)
    assert "Traceback" not in srv.log()
    # Server errors, checked here instead of by schemathesis: the schema lets a client ask for a 0.1 s deadline, which
    # a loaded machine may miss (504 timeout, the documented answer); anything else 5xx is a bug.
    statuses = re.findall(r'HTTP/1\.1" (\d{3})', srv.log())
    assert statuses and not [s for s in statuses if s.startswith("5") and s != "504"], sorted(set(statuses))
