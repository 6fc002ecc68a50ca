"""The deployment files validate with the real tools (docker-compose, hadolint, promtool) where installed."""

from __future__ import annotations

import json
import os
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
    import yaml

    out = subprocess.run([tool("docker-compose"), "config"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "nvidia" in out.stdout and "capabilities" in out.stdout  # the GPU reservation
    for name in ("dualrate-gpu", "dualrate-cpu", "prometheus", "grafana"):
        assert name in out.stdout
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "version" not in spec  # obsolete key
    svc = spec["services"]
    # `--profile cpu` brings up the service and Prometheus alone; Grafana only when asked for.
    assert set(svc["prometheus"]["profiles"]) == {"cpu", "gpu"} and svc["grafana"]["profiles"] == ["grafana"]
    for name in ("dualrate-cpu", "dualrate-gpu"):
        assert svc[name]["healthcheck"]["start_period"]
        grace = svc[name]["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) >= 150  # > 120 s request cap + 10 s drain margin
    for name in ("dualrate-cpu", "dualrate-gpu", "prometheus", "grafana"):
        assert svc[name]["image"].startswith("${"), f"{name}: the image name must be a variable"


def test_compose_passes_every_setting_the_user_sets(tmp_path):
    """DUALRATE_API_KEYS=abc in the shell (and a setting in a .env file beside the compose file) must reach every
    service container: before, compose published 0.0.0.0:8000 with three fixed variables and the key never arrived."""
    import yaml

    from service.settings import Settings

    (tmp_path / "docker-compose.yml").write_text((ROOT / "docker-compose.yml").read_text())
    (tmp_path / ".env").write_text("DUALRATE_QUEUE_SIZE=7\nDUALRATE_MAX_ACTIVE_IMAGES=5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALRATE_")}
    env.update(DUALRATE_API_KEYS="abc", DUALRATE_BIND_ADDRESS="0.0.0.0")
    out = subprocess.run([tool("docker-compose"), "--profile", "cpu", "--profile", "gpu", "--profile", "lb",
                          "--profile", "replicas", "config"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    expected = {f"DUALRATE_{n.upper()}" for n in Settings.model_fields} - {"DUALRATE_HOST", "DUALRATE_PORT"}
    from service.core.telemetry import OTEL_VARIABLES

    expected |= set(OTEL_VARIABLES)  # the OpenTelemetry variables that turn traces on, passed through too
    for name in ("dualrate-cpu", "dualrate-gpu", "dualrate-replica", "dualrate-pg-replica"):
        environment = services[name]["environment"]
        assert environment["DUALRATE_API_KEYS"] == "abc", name
        assert str(environment["DUALRATE_QUEUE_SIZE"]) == "7" and str(environment["DUALRATE_MAX_ACTIVE_IMAGES"]) == "5"
        assert environment["DUALRATE_LATENCY_TARGET_S"] is None  # unset: the image's default, not a blank value
        assert set(environment) == expected, f"{name}: missing {expected - set(environment)}"


def test_dockerfile_needs_no_frontend_and_caps_requests_below_the_stop_grace():
    text = (ROOT / "Dockerfile").read_text()
    assert "# syntax" not in text.splitlines()[0]
    assert "STOPSIGNAL SIGTERM" in text and "DUALRATE_MAX_TIMEOUT_S=120" in text
    assert "torch==2.13.0+cpu" in text  # the CPU image carries the CPU build


def test_gpu_entrypoint_falls_back_when_the_engine_build_fails(tmp_path):
    """Where TensorRT imports but its build fails, the entrypoint must start the service on the next backend, not
    exit (with restart: unless-stopped an exit became a restart loop). A `python` on PATH plays both parts: it
    imports tensorrt fine and fails the engine build, the two outcomes the entrypoint branches on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in\n  *"import tensorrt"*) exit 0 ;;\n'
                    '  *engines.build*) echo "engine build failed" >&2; exit 1 ;;\nesac\nexit 9\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DUALRATE_BACKEND": "auto"}
    out = subprocess.run(["sh", str(ROOT / "deploy" / "gpu-entrypoint.sh"), "sh", "-c", "echo backend=$DUALRATE_BACKEND"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "backend=torch"
    assert "TensorRT engine build failed" in out.stderr


def test_dockerfile_has_no_hadolint_errors():
    out = subprocess.run([tool("hadolint"), "--failure-threshold", "error", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and "AS gpu" in text and "AS cpu" in text


def test_prometheus_config_is_valid():
    out = subprocess.run([tool("promtool"), "check", "config", "deploy/prometheus/prometheus.yml"], cwd=ROOT,
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
        if p["type"] == "row":  # a row only groups the panels below it
            continue
        assert p["datasource"]["uid"] == ds_uid
        assert p["targets"] and all(t["expr"] for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "queue", "batch", "reuse", "errors"):
        assert topic in titles


def test_compose_publishes_on_loopback_unless_told_otherwise():
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    published = [(name, p) for name, svc in services.items() for p in svc.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("${DUALRATE_BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    if shutil.which("docker-compose"):
        out = subprocess.run(["docker-compose", "--profile", "cpu", "config"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "127.0.0.1" in out.stdout, out.stderr


def test_the_replicas_profile_shares_one_postgres_job_store_behind_nginx():
    """Issue 39: `--profile replicas` runs two replicas on one PostgreSQL (not published), behind nginx; the `lb`
    replicas, which would each keep their own SQLite file, have jobs off; the single services keep theirs in a volume."""
    import yaml

    out = subprocess.run([tool("docker-compose"), "--profile", "replicas", "--profile", "lb", "--profile", "cpu",
                          "config"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    svc = yaml.safe_load(out.stdout)["services"]
    pg, rep = svc["postgres"], svc["dualrate-pg-replica"]
    assert "ports" not in pg and rep["scale"] == 2 and rep["depends_on"]["postgres"]["condition"] == "service_healthy"
    store = rep["environment"]["DUALRATE_JOB_STORE"]
    assert store.startswith("postgresql://dualrate:") and store.endswith("@postgres:5432/dualrate")
    assert pg["environment"]["POSTGRES_DB"] == "dualrate" and pg["environment"]["POSTGRES_USER"] == "dualrate"
    assert svc["dualrate-replica"]["environment"]["DUALRATE_JOB_STORE"] == "off"
    conf = (ROOT / "deploy" / "nginx" / "replicas.conf").read_text()
    assert "server dualrate-pg-replica:8000" in conf

    def mounts(service: dict) -> dict[str, str]:  # target -> source, from either rendering (v1 strings, v2 objects)
        out = {}
        for v in service["volumes"]:
            source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
            out[target] = source
        return out

    assert mounts(svc["nginx-replicas"])["/etc/nginx/conf.d/default.conf"].endswith("replicas.conf")
    assert "/var/lib/dualrate" in mounts(svc["dualrate-cpu"])
    # The single services name the image's store explicitly: a bare name would reach the container empty.
    for name in ("dualrate-cpu", "dualrate-gpu"):
        assert svc[name]["environment"]["DUALRATE_JOB_STORE"] == "sqlite:////var/lib/dualrate/jobs.db", name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("DUALRATE_JOB_STORE=sqlite:////var/lib/dualrate/jobs.db") == 2  # both images
