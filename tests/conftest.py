"""Shared fixtures: the real shipped checkpoint, tiny models for fast unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from loadtests.process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent

# Two cores shared with whatever else runs: keep the tests from oversubscribing them. Under pytest-xdist (make test
# runs two workers) each worker and each server it starts gets one thread: two of them at two threads each spin on
# each other's cores (measured: CPU time up 3% and wall time 1.35x where 2x was possible).
THREADS = int(os.environ.get("DUALRATE_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"))
torch.set_num_threads(THREADS)


CHECKPOINT = Path(os.environ.get("DUALRATE_TEST_CHECKPOINT", DEFAULT_CHECKPOINT))


SERVER_FIXTURES = {"start_server", "server", "keyed", "bounded", "split"}


# The modules that take longest (`pytest --durations=0` on a fresh clone), longest first. make test hands whole
# modules to its workers in collection order (--dist loadfile): these go first, so that no long module starts last
# and runs alone while the other worker idles.
LONGEST_FIRST = (
    "tests/service/api/test_hardening.py", "tests/service/api/test_jobs_durable.py", "tests/dualrate/test_evaluate.py",
    "tests/engines/test_compiled.py", "tests/deploy/test_load_balancer.py", "tests/service/core/test_engine_process.py",
    "tests/service/api/test_robustness.py", "tests/service/api/test_browser.py", "tests/scripts/test_gpu_run.py",
    "tests/loadtests/test_stream_cost.py", "tests/loadtests/test_jobs_bench.py", "tests/service/core/test_autok.py",
    "tests/service/api/test_geometry.py", "tests/service/api/test_foreign_model.py",
    "tests/loadtests/test_overload_repeat.py", "tests/dualrate/test_distill.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts a real server is slow, whatever its module says: `pytest -m "not slow"` (make test-quick)
    runs no server. The longest modules are moved to the front (LONGEST_FIRST), the rest keep their order."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    if not (CHECKPOINT / "model_card.json").is_file():
        pytest.fail(f"the shipped checkpoint is missing at {CHECKPOINT}")
    return CHECKPOINT


@pytest.fixture(scope="session")
def onnx_dir(checkpoint_dir):
    from export import export_onnx

    return export_onnx(checkpoint_dir).directory


@pytest.fixture(scope="session")
def engine(checkpoint_dir, onnx_dir):
    """One real ONNX Runtime engine of the shipped checkpoint for the whole session (32 rows: 16 guided slots)."""
    from engines import create_engine

    e = create_engine(checkpoint_dir, backend="onnxruntime", device="cpu", max_batch=32)
    yield e
    e.close()


@pytest.fixture(scope="session")
def model(checkpoint_dir):
    from dualrate.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, student): a tiny random pair whose card asks for 8 steps, K = 4, guidance 1.5, and a student distilled
    from it (one step of dualrate.distill) for 4 steps with the encoder every 2: its card's defaults 4 / 2 / 1.0.
    Read only: a test that changes either copies it first."""
    import json

    from dualrate.distill import cli
    from dualrate.init import init_checkpoint

    root = tmp_path_factory.mktemp("distilled")
    teacher = init_checkpoint("tiny", root / "teacher", seed=6)
    card = json.loads((teacher / "model_card.json").read_text())
    card["defaults"].update(steps=8, encoder_interval=4, guidance_scale=1.5)
    (teacher / "model_card.json").write_text(json.dumps(card))
    cli(["--teacher", str(teacher), "--steps", "4", "--encoder-interval", "2", "--batch-size", "4", "--train-steps", "1",
         "--out", str(root / "run"), "--checkpoint", str(root / "student")])
    return teacher, root / "student"


# The servers start_server has started and not yet stopped: a failing test's report carries the end of their logs.
LIVE_SERVERS: list[ServerProcess] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for s in LIVE_SERVERS:
            report.sections.append((f"server log {s.log_path} (last 4000 characters)", s.log()[-4000:]))


@pytest.fixture(scope="module")
def start_server(checkpoint_dir, onnx_dir, tmp_path_factory):
    """Factory: start a real server with given settings; all are stopped at module end."""
    servers: list[ServerProcess] = []

    def start(**settings: object) -> ServerProcess:
        settings.setdefault("threads", THREADS)
        checkpoint = settings.pop("checkpoint", checkpoint_dir)
        s = ServerProcess(checkpoint, tmp_path_factory.mktemp("server") / "server.log", **settings)
        servers.append(s)
        LIVE_SERVERS.append(s)
        s.wait_ready()
        return s

    yield start
    for s in servers:
        s.terminate()
        LIVE_SERVERS.remove(s)


def encoder_waits_for_light_network(engine, monkeypatch) -> list[tuple[bool, str]]:
    """Instrument `engine`: each encoder call first waits (up to 5 s) until a light-network call has started, and
    records (whether one had, the encoder's thread name). A caller that runs the encoder before the light network,
    on the same thread, makes the wait time out: the record says False."""
    import threading

    light_started, seen = threading.Event(), []
    real_encode, real_denoise = engine.encode, engine.denoise

    def encode(*args):
        seen.append((light_started.wait(timeout=5), threading.current_thread().name))
        return real_encode(*args)

    def denoise(*args):
        light_started.set()
        return real_denoise(*args)

    monkeypatch.setattr(engine, "encode", encode)
    monkeypatch.setattr(engine, "denoise", denoise)
    return seen


def slot_freed_after_disconnect(url: str, timeout: float = 10.0) -> bool:
    """Wait until the server has counted a cancelled request and holds no active image (the disconnected client's
    slot is free again). -> whether that happened within `timeout`."""
    import time

    import httpx

    from loadtests.process import metric

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = httpx.get(f"{url}/metrics").text
        if metric(m, "dualrate_requests_total", 'outcome="cancelled"') >= 1 and metric(m, "dualrate_active_images") == 0:
            return True
        time.sleep(0.1)
    return False
