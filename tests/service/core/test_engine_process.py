"""The engine core in its own process (DUALRATE_ENGINE_PROCESS=on) behind a real front end, over real HTTP: the same
images as the in-process service, streams, metrics from both sides, cancel on disconnect, SIGTERM drains both
processes, and a killed core makes the front end answer 503 and exit non-zero."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from loadtests.process import metric
from tests.conftest import slot_freed_after_disconnect
from tests.service.api.test_robustness import _drain_run
from tests.service.api.test_stream import stream

pytestmark = pytest.mark.slow  # real servers

BODY = {"class_label": 7, "num_images": 2, "steps": 12, "encoder_interval": 4, "seed": 123}


def core_pid(front_pid: int, timeout: float = 10.0) -> int:
    """The front end's child named engine-core (/proc), as `ps` shows it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == front_pid and (d / "comm").read_text().strip() == "engine-core":
                return int(d.name)
        time.sleep(0.1)
    raise AssertionError(f"no engine-core child of {front_pid}")


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def split(start_server):
    return start_server(engine_process="on", max_active_images=8, max_images_per_request=4, queue_size=32)


def test_split_and_in_process_give_the_images_of_before_the_seam_byte_for_byte(split, start_server):
    """tests/service/golden_images.json: the PNGs main answered before the seam (its commit is in the file), for
    requests across labels, unconditional, guidance, K = 1..8 and K > steps, a batch priority."""
    golden = json.loads((Path(__file__).parents[1] / "golden_images.json").read_text())
    local = start_server(engine_process="off", max_active_images=8, max_images_per_request=4, queue_size=32)
    for server in (split, local):
        for case in golden["answers"]:
            r = httpx.post(f"{server.url}/generate", json=case["request"], timeout=120)
            assert r.status_code == 200, r.text
            got = [hashlib.sha256(base64.b64decode(i["png_base64"])).hexdigest() for i in r.json()["images"]]
            assert got == case["png_sha256"], (server.url, case["request"])
    a = httpx.post(f"{split.url}/generate", json=BODY, timeout=120).json()
    b = httpx.post(f"{local.url}/generate", json=BODY, timeout=120).json()
    assert a == {**b, "timings": a["timings"], "request_id": a["request_id"]} and a["encoder_calls"] == 3
    assert "in its own process" in split.log() and "in this process" in local.log()


def test_the_core_is_named_engine_core_and_metrics_come_from_both_sides(split):
    pid = core_pid(split.proc.pid)
    assert "engine-core" in (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().replace("\0", " ")
    httpx.post(f"{split.url}/generate", json=BODY, timeout=120).raise_for_status()
    m = httpx.get(f"{split.url}/metrics").text
    assert metric(m, "dualrate_requests_total", 'outcome="ok"') >= 1  # the front end's series
    assert metric(m, "dualrate_network_calls_total", 'network="denoiser"') >= 12  # the core's
    assert m.count("# TYPE dualrate_requests_total ") == 1 and m.count("# TYPE dualrate_queue_depth ") == 1
    # The priority crosses the process boundary (a plain string in the message) and the core counts it.
    before = metric(m, "dualrate_priority_request_duration_seconds_count", 'priority="batch"')
    httpx.post(f"{split.url}/generate", json={**BODY, "priority": "batch"}, timeout=120).raise_for_status()
    m = httpx.get(f"{split.url}/metrics").text
    assert metric(m, "dualrate_priority_request_duration_seconds_count", 'priority="batch"') == before + 1


def test_a_stream_gets_previews_and_done_through_the_core(split):
    r, events = stream(split.url, {**BODY, "preview_every": 4})
    assert r.status_code == 200
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and "preview" in names
    done = events[-1][1]
    plain = httpx.post(f"{split.url}/generate", json=BODY, timeout=120).json()
    assert [i["png_base64"] for i in done["images"]] == [i["png_base64"] for i in plain["images"]]


def test_a_full_queue_is_429_across_the_process_boundary(start_server):
    srv = start_server(engine_process="on", max_active_images=1, max_images_per_request=1, queue_size=1)

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/generate", json={"class_label": 1, "steps": 40}) for _ in range(6)])

    codes = sorted(r.status_code for r in asyncio.run(flood()))
    assert 429 in codes and 200 in codes, codes


def test_disconnect_frees_the_slot_in_the_core(start_server):
    srv = start_server(engine_process="on", max_active_images=1, max_images_per_request=1, max_steps=256)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/generate", json={"class_label": 4, "steps": 256, "encoder_interval": 1}, timeout=0.5)
    assert slot_freed_after_disconnect(srv.url), "the disconnected request still holds its slot in the core"


def test_sigterm_drains_both_processes_with_nothing_lost(start_server):
    srv = start_server(engine_process="on", max_active_images=4, max_images_per_request=2)
    core = core_pid(srv.proc.pid)
    rs, late = _drain_run(srv, [(0.0, signal.SIGTERM)])
    assert [getattr(r, "status_code", r) for r in rs] == [200] * 6
    assert not isinstance(late, Exception) and late.status_code == 503
    assert srv.proc.wait(60) == 0, srv.log()
    assert not alive(core), "the engine core outlived the drain"
    assert "engine core exited with 0" in srv.log()


def test_a_killed_core_gives_503_and_the_front_end_exits_non_zero(start_server):
    srv = start_server(engine_process="on", max_active_images=1, max_images_per_request=1, max_steps=256)

    async def run() -> tuple[httpx.Response, float, int, int]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            pending = asyncio.create_task(c.post("/generate", json={"class_label": 2, "steps": 256, "encoder_interval": 1}))
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            os.kill(core_pid(srv.proc.pid), signal.SIGKILL)
            r = await pending
            seconds = time.monotonic() - t0
            # The front end lingers a second to answer: liveness and readiness say the core is gone.
            live, ready = (await c.get("/health/live")).status_code, (await c.get("/health/ready")).status_code
            return r, seconds, live, ready

    r, seconds, live, ready = asyncio.run(run())
    assert live == ready == 503
    assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
    assert "engine core stopped" in r.json()["message"]
    assert seconds < 5
    code = srv.proc.wait(15)
    assert code not in (0, None), srv.log()
    folder = socket_folder(srv.log())
    assert not folder.exists(), f"the core's socket folder {folder} was left after its crash"


def socket_folder(log: str) -> Path:
    """The engine core's ipc folder, from the front end's log line "engine core started (pid N) at ipc://..."."""
    match = re.search(r"engine core started \(pid \d+\) at ipc://(\S+)/core\.sock", log)
    assert match, log
    return Path(match.group(1))


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_two_front_end_workers_share_one_core_and_pool_their_metrics(start_server):
    srv = start_server(frontend_workers=2, max_active_images=8, max_images_per_request=4, queue_size=64)
    kids = children(srv.proc.pid)
    names = sorted((Path("/proc") / str(k) / "comm").read_text().strip() for k in kids)
    assert len(kids) == 3 and names.count("engine-core") == 1, names

    async def many() -> list[httpx.Response]:
        # A new connection per request: the kernel spreads connections over the workers.
        async def one(i: int) -> httpx.Response:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await c.post("/generate", json={**BODY, "num_images": 1, "seed": 500 + i})
        return list(await asyncio.gather(*[one(i) for i in range(12)]))

    rs = asyncio.run(many())
    assert [r.status_code for r in rs] == [200] * 12
    for _ in range(4):  # whichever worker answers the scrape, it reports all of them
        m = httpx.get(f"{srv.url}/metrics").text
        assert metric(m, "dualrate_requests_total", 'outcome="ok"') >= 12
        assert metric(m, "dualrate_network_calls_total", 'network="denoiser"') >= 12
    assert srv.terminate() == 0, srv.log()
    assert not any(alive(k) for k in kids), "a worker or the core outlived the drain"
