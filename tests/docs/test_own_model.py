"""docs/own-model.md runs as written: its file, then each of its steps (export, check, serve, request) in a fresh
folder with the project's Python first on PATH."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loadtests.process import free_port, wait_until_ok

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "own-model.md"


def blocks() -> dict[str, str]:
    """The doc's fenced blocks by their tag: file=NAME or step=NAME."""
    found = re.findall(r"^```\w+ (file|step)=(\S+)\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return {name: body for _, name, body in found}


@pytest.mark.slow
def test_the_bring_your_own_model_tutorial_runs_as_written(tmp_path):
    b = blocks()
    assert set(b) == {"my_pair.py", "export", "check", "serve", "request"}, sorted(b)
    (tmp_path / "my_pair.py").write_text(b["my_pair.py"])
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DUALRATE_PORT": str(port)}
    env.pop("DUALRATE_CHECKPOINT", None)

    def run(step: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", b[step]], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=300)

    done = run("export")
    assert done.returncode == 0, done.stderr
    done = run("check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ok: format") == 2, done.stdout
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(["bash", "-c", b["serve"]], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until_ok(f"http://127.0.0.1:{port}/health/ready", 120, server), (tmp_path / "serve.log").read_text()
        b["request"] = b["request"].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        done = run("request")
        assert done.returncode == 0, done.stderr
        assert "star-1.png, seed 8" in done.stdout, done.stdout
        for i in range(2):
            img = Image.open(tmp_path / f"star-{i}.png")
            assert (img.mode, img.size) == ("RGB", (16, 12))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
