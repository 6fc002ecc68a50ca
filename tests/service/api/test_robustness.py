"""Backpressure, deadlines, disconnects, engine failures and SIGTERM, each against its own real server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from loadtests.process import metric
from tests.conftest import slot_freed_after_disconnect

pytestmark = pytest.mark.slow  # real servers / training / the evaluator: `pytest -m "not slow"` skips them

LONG = {"class_label": 4, "num_images": 1, "steps": 256, "encoder_interval": 1, "seed": 5}


def test_full_queue_gives_429_with_retry_after(start_server):
    srv = start_server(max_active_images=1, max_images_per_request=1, queue_size=1)

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/generate", json={**LONG, "steps": 40}) for _ in range(6)])

    rs = asyncio.run(flood())
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and 200 in codes, codes
    rejected = next(r for r in rs if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"] == "queue_full"
    assert metric(httpx.get(f"{srv.url}/metrics").text, "dualrate_requests_total", 'outcome="queue_full"') >= 1


def test_deadline_gives_504_and_frees_the_slot(start_server):
    srv = start_server(max_active_images=1, max_images_per_request=1, max_steps=256)
    r = httpx.post(f"{srv.url}/generate", json={**LONG, "timeout_s": 0.3}, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["error"] == "timeout"
    # The slot is free again: a short request is served at once.
    ok = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 4, "encoder_interval": 2}, timeout=60)
    assert ok.status_code == 200
    assert ok.json()["timings"]["queue_ms"] < 1000


def test_client_disconnect_frees_its_slot(start_server):
    srv = start_server(max_active_images=1, max_images_per_request=1, max_steps=256)
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/generate", json=LONG, timeout=0.5)
    # The long request would hold the only slot for many seconds; after the disconnect it must be gone.
    if not slot_freed_after_disconnect(srv.url):
        pytest.fail("the disconnected request still holds its slot")
    ok = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 4, "encoder_interval": 2}, timeout=60)
    assert ok.status_code == 200
    full = httpx.post(f"{srv.url}/generate", json={**LONG, "timeout_s": 60}, timeout=120)  # what it would have cost
    assert full.status_code == 200
    assert time.monotonic() - t0 < 0.5 + 10 + full.json()["timings"]["total_ms"] / 1000 + 30
    # The abandoned request's outcome is retrieved: no "Future exception was never retrieved" at ERROR.
    assert "never retrieved" not in srv.log(), srv.log()


async def _accepted(c: httpx.AsyncClient, images: int) -> None:
    """Wait until the scheduler holds `images` images (active + queued); the metric counts queued requests, so the
    caller's jobs all have the same size (2 images each)."""
    for _ in range(500):
        m = (await c.get("/metrics")).text
        if metric(m, "dualrate_active_images") + 2 * metric(m, "dualrate_queue_depth") >= images:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the requests never reached the scheduler")


def _drain_run(srv, signals: list[tuple[float, int]], *, group: bool = False):
    """Six 2-image requests, then the signals (delay, signum), then one late request. -> (responses, late)."""

    async def run() -> tuple[list[httpx.Response | Exception], httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            tasks = [asyncio.create_task(c.post("/generate", json={"class_label": i, "num_images": 2, "steps": 30,
                                                                   "encoder_interval": 2, "seed": i}))
                     for i in range(6)]
            await _accepted(c, 12)  # all six accepted (4 images running, 4 requests queued), not just the first two
            for delay, sig in signals:
                await asyncio.sleep(delay)
                if group:
                    os.killpg(srv.proc.pid, sig)
                else:
                    srv.proc.send_signal(sig)
            await asyncio.sleep(0.3)
            try:
                late: httpx.Response | Exception = await c.post("/generate", json={"class_label": 1, "steps": 4})
            except httpx.HTTPError as e:
                late = e
            rs = await asyncio.gather(*tasks, return_exceptions=True)
            return list(rs), late

    return asyncio.run(run())


def test_sigterm_loses_no_accepted_request(start_server):
    srv = start_server(max_active_images=4, max_images_per_request=2)
    rs, late = _drain_run(srv, [(0.0, signal.SIGTERM)])
    assert [getattr(r, "status_code", r) for r in rs] == [200] * 6
    assert all(len(r.json()["images"]) == 2 for r in rs)
    # While draining the socket stays open: new work gets an answer, 503.
    assert not isinstance(late, Exception), late
    assert late.status_code == 503 and late.json()["error"] == "unavailable"
    assert srv.proc.wait(60) == 0, srv.log()


def test_repeated_signals_to_the_process_group_do_not_cut_the_drain_short(start_server):
    """`make serve` + Ctrl-C: the terminal signals the group and make forwards the signal, so Python gets it twice.
    Repeats within the grace period are ignored: every accepted request completes, late ones get 503, exit 0."""
    srv = start_server(max_active_images=4, max_images_per_request=2, signal_grace_s=30, new_session=True)
    rs, late = _drain_run(srv, [(0.0, signal.SIGINT), (0.05, signal.SIGINT), (0.2, signal.SIGTERM)], group=True)
    assert [getattr(r, "status_code", r) for r in rs] == [200] * 6, srv.log()
    assert not isinstance(late, Exception), late
    assert late.status_code == 503
    assert srv.proc.wait(60) == 0, srv.log()
    assert "ignored (within the 30 s grace period)" in srv.log()


def test_signal_after_the_grace_period_cancels_the_rest_and_exits_1(start_server):
    srv = start_server(max_active_images=1, max_images_per_request=1, max_steps=4096, signal_grace_s=0.5)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            tasks = [asyncio.create_task(c.post("/generate", json={**LONG, "steps": 4096, "seed": i}))
                     for i in range(2)]
            for _ in range(500):
                if metric((await c.get("/metrics")).text, "dualrate_queue_depth") >= 1:
                    break
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            srv.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks))

    t0 = time.monotonic()
    rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [503, 503], [r.text for r in rs]
    assert "repeated signal" in rs[0].json()["message"]
    assert srv.proc.wait(30) == 1
    assert time.monotonic() - t0 < 30  # 4096 steps at K = 1 would take minutes


def test_drain_timeout_bounds_the_drain(start_server):
    srv = start_server(max_active_images=1, max_images_per_request=1, max_steps=4096, drain_timeout_s=1.0)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            task = asyncio.create_task(c.post("/generate", json={**LONG, "steps": 4096}))
            for _ in range(500):
                if metric((await c.get("/metrics")).text, "dualrate_active_images") >= 1:
                    break
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            return await task

    r = asyncio.run(run())
    assert r.status_code == 503 and "drain timed out" in r.json()["message"]
    assert srv.proc.wait(30) == 1
    assert "DUALRATE_DRAIN_TIMEOUT_S" in srv.log()


def test_invalid_settings_give_one_line_each_and_never_print_keys(checkpoint_dir):
    env = {**os.environ, "DUALRATE_API_KEYS": '["s3cret-key", ', "DUALRATE_PORT": "eighty",
           "DUALRATE_CHECKPOINT": str(checkpoint_dir)}
    p = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 2, p.stderr
    assert any(line.startswith("invalid setting: DUALRATE_PORT:") for line in lines)
    assert any(line.startswith("invalid setting: DUALRATE_API_KEYS:") for line in lines)
    assert "s3cret" not in p.stderr and "Traceback" not in p.stderr


def test_ctrl_c_on_make_serve_drains(tmp_path, checkpoint_dir):
    """The README's `make serve`, interrupted as a terminal does (SIGINT to the whole foreground process group, which
    make also forwards to its child): accepted requests complete, new ones get 503, the service logs a full drain."""
    from types import SimpleNamespace

    from loadtests.process import ROOT, free_port, wait_until_ok

    port = free_port()
    log_path = tmp_path / "make-serve.log"
    env = {**os.environ, "DUALRATE_PORT": str(port), "DUALRATE_MAX_ACTIVE_IMAGES": "4",
           "DUALRATE_MAX_IMAGES_PER_REQUEST": "2", "DUALRATE_THREADS": "2"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(["make", "-s", "serve", f"CHECKPOINT={checkpoint_dir}"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert wait_until_ok(f"http://127.0.0.1:{port}/health/ready", 120, proc), log_path.read_text()
            srv = SimpleNamespace(url=f"http://127.0.0.1:{port}", proc=proc)
            rs, late = _drain_run(srv, [(0.0, signal.SIGINT)], group=True)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert [getattr(r, "status_code", r) for r in rs] == [200] * 6, text
    assert not isinstance(late, Exception) and late.status_code == 503, (late, text)
    assert "drained; shutting down" in text, text
