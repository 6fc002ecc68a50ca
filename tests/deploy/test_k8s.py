"""The Kubernetes manifests: both overlays render with `kubectl kustomize` (Debian's kubectl) and every object
validates against the Kubernetes schema (kubernetes-validate, strict: unknown fields fail), and they say what the
service needs: probes on its health endpoints, a grace period that covers the drain, autoscaling on load."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from service.metrics import PrometheusStats

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes still in common support and the newest schema the package knows.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]

if shutil.which("kubectl") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must check the manifests: kubectl missing (scripts/install_test_tools.sh)")
    pytest.skip("kubectl is not installed", allow_module_level=True)


def render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def container(objs: list[dict]) -> dict:
    (c,) = by_kind(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(overlay, version):
    _, objs = overlay
    assert {o["kind"] for o in objs} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any schema error


def test_the_schema_check_catches_a_wrong_field():
    objs = render(K8S / "overlays" / "cpu")
    deployment = by_kind(objs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_monitoring_rule_validates():
    for obj in render(K8S / "monitoring"):
        kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)
        assert "dualrate_load_ratio" in obj["data"]["config.yaml"]


def test_probes_security_and_a_grace_period_that_covers_the_drain(overlay):
    _, objs = overlay
    spec = by_kind(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert not c["securityContext"]["allowPrivilegeEscalation"]
    assert any(v["mountPath"] == "/tmp" for v in c["volumeMounts"])  # the only writable path the service needs
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    e = env(c)
    # The longest request is answered within the drain, and the drain ends before the kubelet's SIGKILL.
    assert float(e["DUALRATE_MAX_TIMEOUT_S"]) <= float(e["DUALRATE_DRAIN_TIMEOUT_S"])
    assert pre_stop + float(e["DUALRATE_DRAIN_TIMEOUT_S"]) < spec["terminationGracePeriodSeconds"]
    assert by_kind(objs, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ann = by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(c["ports"][0]["containerPort"])
    # The Service and the PDB select the Deployment's pods.
    labels = by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind, sel in (("Service", by_kind(objs, "Service")["spec"]["selector"]),
                      ("PodDisruptionBudget", by_kind(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])):
        assert sel and all(labels.get(k) == v for k, v in sel.items()), kind


def test_gpu_overlay_asks_for_a_gpu_and_cpu_does_not(overlay):
    name, objs = overlay
    c = container(objs)
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if name == "gpu":
        assert gpus == "1" and env(c)["DUALRATE_DEVICE"].startswith("cuda") and c["image"].endswith(":gpu")
    else:
        assert gpus is None and env(c)["DUALRATE_DEVICE"] == "cpu" and c["image"].endswith(":cpu")


def test_autoscaling_is_on_the_service_load_metric_not_cpu(overlay):
    _, objs = overlay
    hpa = by_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind(objs, "Deployment")["metadata"]["name"]
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "dualrate_load_ratio"
    # The service exports that metric.
    assert "dualrate_load_ratio" in generate_latest(PrometheusStats().registry).decode()
