"""The deployment files validate with the real tools (docker-compose, hadolint, promtool) where installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dualrate.json"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return path


def test_compose_file_is_valid():
    out = subprocess.run([tool("docker-compose"), "config"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "nvidia" in out.stdout and "capabilities" in out.stdout  # the GPU reservation
    for name in ("dualrate-gpu", "dualrate-cpu", "prometheus", "grafana"):
        assert name in out.stdout


def test_dockerfile_has_no_hadolint_errors():
    out = subprocess.run([tool("hadolint"), "--failure-threshold", "error", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and "AS gpu" in text and "AS cpu" in text


def test_prometheus_config_is_valid():
    out = subprocess.run([tool("promtool"), "check", "config", "deploy/prometheus.yml"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_is_valid_provisionable_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ds_uid = "prometheus"
    assert f"uid: {ds_uid}" in (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    provider = (ROOT / "deploy/grafana/provisioning/dashboards/dualrate.yml").read_text()
    assert "path: /etc/grafana/dashboards" in provider
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == ds_uid
        assert p["targets"] and all(t["expr"] for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "queue", "batch", "reuse", "errors"):
        assert topic in titles
