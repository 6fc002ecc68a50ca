"""Run `python -m service` as a child process on a free loopback port (benchmarks, load tests, tests)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def wait_until_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll `url` until it answers 200 (True), `proc` exits, or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: Path, log_path: Path, new_session: bool = False, env: dict[str, str] | None = None,
                 **settings: object) -> None:
        """`new_session`: the child leads its own process group (tests signal the group, as a terminal does); `env`:
        other variables for it (OTEL_*); `settings`: DUALRATE_<NAME> values."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server its own job store (beside its log) unless told otherwise: servers of a test run never share one.
        extra = {"DUALRATE_JOB_STORE": f"sqlite:///{log_path.parent / (log_path.stem + '-jobs.db')}", **(env or {})}
        env = {**os.environ, "DUALRATE_PORT": str(self.port), "DUALRATE_HOST": "127.0.0.1",
               "DUALRATE_CHECKPOINT": str(checkpoint), "DUALRATE_BACKEND": "onnxruntime", "DUALRATE_DEVICE": "cpu",
               "DUALRATE_LOG_LEVEL": "info", **extra}
        env.update({f"DUALRATE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=new_session)

    def wait_ready(self, timeout: float = 120.0) -> None:
        if wait_until_ok(f"{self.url}/health/ready", timeout, self.proc):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
        raise TimeoutError(f"service not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of sample `name` in Prometheus text format whose labels include `labels` (`a="x",b="y"`), summed
    over the samples that match (the per-model series of a service of several models); 0 if none does."""
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels)).items()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and want <= s.labels.items())
