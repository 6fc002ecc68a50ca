"""A frozen engine core (SIGSTOP: what a hung GPU call or a stuck driver looks like from outside), on real processes
on loopback: the heartbeat reports it, requests are answered by their deadline, and a drain always ends in an exit."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.service.core.test_engine_process import alive, core_pid, socket_folder

pytestmark = pytest.mark.slow  # real servers

BEAT = 2.0  # DUALRATE_CORE_HEARTBEAT_TIMEOUT_S in these tests


def status_within(url: str, seconds: float, want_ok: bool) -> float | None:
    """Seconds until GET `url` answers 200 (want_ok) or anything else; None if not within `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            ok = httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok == want_ok:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def test_a_frozen_core_fails_health_and_requests_are_answered_by_their_deadline(start_server):
    srv = start_server(engine_process="on", core_heartbeat_timeout_s=BEAT, max_active_images=2,
                       max_images_per_request=1)
    core = core_pid(srv.proc.pid)
    os.kill(core, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 8, "timeout_s": 2}, timeout=30)
        answered = time.monotonic() - t0
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        assert answered < 3.0, answered  # before: 504 after 44 s, when the core was resumed
        assert r.headers["x-content-type-options"] == "nosniff"
        down = status_within(f"{srv.url}/health/live", BEAT + 3, want_ok=False)
        assert down is not None and time.monotonic() - stopped < BEAT + 3, "liveness still 200 with the core stopped"
        live, ready = httpx.get(f"{srv.url}/health/live"), httpx.get(f"{srv.url}/health/ready")
        assert live.status_code == ready.status_code == 503 and "not answered" in live.json()["message"]
        t0 = time.monotonic()
        assert httpx.get(f"{srv.url}/metrics", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.0  # the core's series are left out, not waited for (was 5 s)
        fresh = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 8}, timeout=10)
        assert fresh.status_code == 503  # refused at once while frozen
    finally:
        os.kill(core, signal.SIGCONT)
    assert status_within(f"{srv.url}/health/live", BEAT + 5, want_ok=True) is not None, "no recovery after SIGCONT"
    ok = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 8}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_sigterm_with_the_core_stopped_exits_within_the_drain_and_its_grace(start_server):
    """Before: the drain took the status query's 5 s timeout for its own, the second drain raised in a task nobody
    awaited, and the front end stayed up for good (only SIGKILL ended it)."""
    drain_s = 3.0
    srv = start_server(engine_process="on", core_heartbeat_timeout_s=BEAT, drain_timeout_s=drain_s,
                       max_active_images=1, max_images_per_request=1)
    core = core_pid(srv.proc.pid)
    folder = socket_folder(srv.log())
    os.kill(core, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(drain_s + BEAT + 5)
        took = time.monotonic() - t0
    finally:
        if alive(core):
            os.kill(core, signal.SIGKILL)
    assert code not in (0, None) and took < drain_s + BEAT + 5, (code, took)
    log = srv.log()
    # The signal's drain found the core frozen, or (a status answered just before the SIGSTOP took hold) it finished
    # and the shutdown's own drain found it: either way bounded, the core stopped, the exit non-zero.
    assert "DUALRATE_DRAIN_TIMEOUT_S" in log, log[-3000:]
    assert "did not answer the cancelled drain" in log or "did not answer the shutdown's drain" in log, log[-3000:]
    assert "610 s" not in log  # the status query's timeout is not the drain's
    deadline = time.monotonic() + 5
    while alive(core) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(core), "the frozen core was left running"
    assert not folder.exists()


def test_an_idle_loop_that_gets_work_is_not_stalled_for_its_idle_time(engine, model):
    """A loop idle for a long time (here: its last tick 100 s ago) that gets a request counts its stall from the
    submission, not from its last tick: a second request checked before the tick thread wakes must not find the core
    frozen (it answered 503 after the flooded model of a two-model service had idled for 15 s)."""
    import threading

    from dualrate.diffusion import CosineSchedule
    from service.core import GenerationSpec, SchedulerConfig
    from service.core.loop import EngineLoop

    loop = EngineLoop(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
                      SchedulerConfig(4, queue_size=8))
    asleep = threading.Event()
    loop._thread = threading.Thread(target=asleep.wait)  # a tick thread that has not woken yet
    loop._thread.start()
    try:
        loop._progress -= 100.0
        loop.submit(GenerationSpec(1, 1, 4, 2, 1.0, seed=1))
        assert loop.stalled_for() < 1.0
    finally:
        asleep.set()
        loop._thread.join()
