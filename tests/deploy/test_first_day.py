"""What a newcomer and an operator hit first (issue 22, items 1, 2, 3's file modes, 7, 8, 9): make serve honours
DUALRATE_CHECKPOINT and installs no dev tools, one message for a wrong checkpoint on every path, checkpoints written
readable, settings that warn about typos and name their variables, a port in use said in one line, and the test-tool
installer stopping only what it started."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from dualrate.init import init_checkpoint
from service.settings import Settings, describe_settings_error, unknown_variables
from tests.conftest import ROOT


def make_dry(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_serves_the_environments_checkpoint_and_installs_no_dev_tools():
    plan = make_dry("serve", env={"DUALRATE_CHECKPOINT": "/somewhere/mine"})
    assert "DUALRATE_CHECKPOINT=/somewhere/mine" in plan and "--checkpoint /somewhere/mine" in plan
    assert "DUALRATE_CHECKPOINT=other" in make_dry("serve", "CHECKPOINT=other", env={"DUALRATE_CHECKPOINT": "/x"})
    assert "pip install --quiet -e ." in plan and "[dev]" not in plan
    assert "[dev]" in make_dry("test")


def test_a_wrong_checkpoint_is_one_line_from_export_and_from_the_settings(tmp_path):
    out = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0] and "DUALRATE_CHECKPOINT" in lines[0], out.stderr
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=tmp_path)  # a folder, but not a checkpoint
    assert "has no model_card.json" in str(e.value)


def test_checkpoints_are_written_readable_by_everyone(tmp_path):
    ck = init_checkpoint("tiny", tmp_path / "ck")
    for f in ck.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f  # group and others may read


def test_settings_warn_about_typos_accept_any_case_and_name_both_variables(monkeypatch):
    lines = unknown_variables({"DUALRATE_PROT": "9000", "DUALRATE_PORT": "1", "DUALRATE_ONNX_CACHE": "/c", "HOME": "/"})
    assert lines == ["DUALRATE_PROT is not a setting and is ignored (did you mean DUALRATE_PORT?)"]
    monkeypatch.setenv("DUALRATE_LOG_LEVEL", "DEBUG")
    assert Settings().log_level == "debug"
    monkeypatch.setenv("DUALRATE_MAX_IMAGES_PER_REQUEST", "64")
    with pytest.raises(ValidationError) as e:
        Settings()
    text = " ".join(describe_settings_error(e.value))
    assert "DUALRATE_MAX_IMAGES_PER_REQUEST (64)" in text and "DUALRATE_MAX_ACTIVE_IMAGES (32)" in text


def test_a_port_in_use_is_one_clear_line_before_anything_loads():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "DUALRATE_PORT": str(port), "DUALRATE_PROT": "1"})
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "DUALRATE_PORT" in out.stderr
    assert "did you mean DUALRATE_PORT" in out.stderr and "ready on http" not in out.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="pgrep is not installed")
def test_the_installer_stops_only_the_processes_it_started(tmp_path):
    fake = tmp_path / "drfakeproc"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    old = subprocess.Popen([str(fake), "60"])
    try:
        time.sleep(0.2)
        before = subprocess.run(["pgrep", "-x", "drfakeproc"], capture_output=True, text=True).stdout
        new = subprocess.Popen([str(fake), "60"])
        time.sleep(0.2)
        subprocess.run(["bash", "scripts/stop_new_processes.sh", "drfakeproc", before], cwd=ROOT, check=True,
                       capture_output=True, timeout=30)
        assert new.wait(10) != 0  # stopped
        assert old.poll() is None  # untouched: it ran before
    finally:
        for p in (old,):
            p.kill()


def test_a_setting_is_suggested_by_meaning_too():
    """The ready line calls DUALRATE_MAX_ACTIVE_IMAGES slots: a user who types SLOTS (or SLOTZ) is pointed there, not
    to DUALRATE_PORT; a name like nothing gets no suggestion."""
    lines = unknown_variables({"DUALRATE_SLOTZ": "4", "DUALRATE_API_KEY": "k", "DUALRATE_XYZZY": "1"})
    assert lines == ["DUALRATE_API_KEY is not a setting and is ignored (did you mean DUALRATE_API_KEYS?)",
                     "DUALRATE_SLOTZ is not a setting and is ignored (did you mean DUALRATE_MAX_ACTIVE_IMAGES?)",
                     "DUALRATE_XYZZY is not a setting and is ignored"]


@pytest.mark.slow
def test_help_lists_every_setting_one_line_each_and_starts_nothing():
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "Uvicorn" not in done.stderr and "ready on" not in done.stderr
    listed = [line for line in done.stdout.splitlines() if line.startswith("  DUALRATE_")]
    assert [line.split(" = ")[0].strip() for line in listed] == [f"DUALRATE_{n.upper()}" for n in Settings.model_fields]
    assert "  DUALRATE_PORT = 8000: port uvicorn listens on" in listed
    wrong = subprocess.run([sys.executable, "-m", "service", "serve"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and "python -m service --help lists them" in wrong.stderr
