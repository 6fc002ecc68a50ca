"""Backpressure, deadlines, disconnects, engine failures and SIGTERM, each against its own real server."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from service.process import metric

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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = httpx.get(f"{srv.url}/metrics").text
        if metric(m, "dualrate_requests_total", 'outcome="cancelled"') >= 1 and metric(m, "dualrate_active_images") == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnected request still holds its slot")
    ok = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 4, "encoder_interval": 2}, timeout=60)
    assert ok.status_code == 200
    full = httpx.post(f"{srv.url}/generate", json={**LONG, "timeout_s": 60}, timeout=120)  # what it would have cost
    assert full.status_code == 200
    assert time.monotonic() - t0 < 0.5 + 10 + full.json()["timings"]["total_ms"] / 1000 + 30


def test_engine_failure_fails_only_its_batch_and_service_keeps_serving(start_server):
    srv = start_server(max_active_images=4, max_images_per_request=2, fault_injection_seed=666)
    bad = httpx.post(f"{srv.url}/generate", json={"class_label": 3, "steps": 6, "seed": 666}, timeout=60)
    assert bad.status_code == 500
    body = bad.json()
    assert body["error"] == "engine_error" and len(body["error_id"]) == 12
    assert body["error_id"] in srv.log(), "the error id must be in the server log"
    for seed in (1, 2):
        ok = httpx.post(f"{srv.url}/generate", json={"class_label": 3, "steps": 6, "seed": seed}, timeout=60)
        assert ok.status_code == 200
    assert metric(httpx.get(f"{srv.url}/metrics").text, "dualrate_requests_total", 'outcome="engine_error"') == 1


def test_sigterm_loses_no_accepted_request(start_server):
    srv = start_server(max_active_images=4, max_images_per_request=2)

    async def run() -> tuple[list[httpx.Response], httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            tasks = [asyncio.create_task(c.post("/generate", json={"class_label": i, "num_images": 2, "steps": 30,
                                                                   "encoder_interval": 2, "seed": i}))
                     for i in range(6)]
            # Wait until the scheduler has them all (active + queued), then SIGTERM.
            for _ in range(200):
                m = (await c.get("/metrics")).text
                if metric(m, "dualrate_active_images") + metric(m, "dualrate_queue_depth") * 2 >= 4:
                    break
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:
                late: httpx.Response | Exception = await c.post("/generate", json={"class_label": 1, "steps": 4})
            except httpx.HTTPError as e:
                late = e
            return list(await asyncio.gather(*tasks)), late

    rs, late = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * 6
    assert all(len(r.json()["images"]) == 2 for r in rs)
    # After SIGTERM, new work is refused: 503 while draining, or the socket is already closed.
    assert isinstance(late, Exception) or late.status_code == 503
    assert srv.proc.wait(60) == 0
