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

from service.core import CoreStats, CoreStatus, SchedulerSnapshot
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
    """The container's plain values (variables read from a Secret are left out: `secret_env`)."""
    return {e["name"]: e["value"] for e in c["env"] if "value" in e}


def secret_env(c: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.fixture(scope="module", params=["cpu", "gpu", "models", "jobs"])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(overlay, version):
    name, objs = overlay
    kinds = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress", "NetworkPolicy"}
    assert {o["kind"] for o in objs} == kinds | ({"PersistentVolumeClaim"} if name in ("gpu", "models") else set())
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any schema error


def test_the_schema_check_catches_a_wrong_field():
    objs = render(K8S / "overlays" / "cpu")
    deployment = by_kind(objs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


MONITORING = K8S / "monitoring"


def test_the_adapter_rule_is_a_merge_snippet_not_a_configmap_that_replaces_the_adapters():
    # `kubectl apply -k` of a prometheus-adapter ConfigMap replaced every other rule of the cluster's adapter.
    for f in MONITORING.rglob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "ConfigMap"), f
    assert not (MONITORING / "kustomization.yaml").exists()
    (rule,) = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == "dualrate_load_ratio" and "dualrate_load_ratio" in rule["seriesQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_scrape_job_is_valid_and_writes_the_labels_the_adapter_rule_reads(tmp_path):
    job = yaml.safe_load((MONITORING / "prometheus-scrape-job.yaml").read_text())
    assert job[0]["kubernetes_sd_configs"] == [{"role": "pod"}]
    # Debian's Prometheus is built without Kubernetes discovery: promtool checks the job with a static target in its
    # place, which still parses and compiles every relabelling rule.
    config = tmp_path / "prometheus.yml"
    checked = {k: v for k, v in job[0].items() if k != "kubernetes_sd_configs"}
    config.write_text(yaml.safe_dump({"scrape_configs": [{**checked, "static_configs": [{"targets": ["pod:8000"]}]}]}))
    promtool = shutil.which("promtool")
    if promtool is None and not os.environ.get("CI"):
        pytest.skip("promtool is not installed")
    out = subprocess.run([promtool or "promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    written = {r.get("target_label") for r in job[0]["relabel_configs"]}
    (rule,) = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert set(rule["resources"]["overrides"]) <= written


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_podmonitor_selects_the_pods_on_a_named_port(name):
    (pm,) = render(MONITORING / "operator")
    assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
    objs = render(K8S / "overlays" / name)
    labels = by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in {p["name"] for p in container(objs)["ports"]} and ep["path"] == "/metrics"


def test_every_path_the_manifests_mention_exists():
    # deployment.yaml once pointed at a deploy/k8s/README.md that did not exist.
    import re

    for f in K8S.rglob("*.yaml"):
        for ref in re.findall(r"deploy/k8s/[\w./-]*\w", f.read_text()):
            assert (ROOT / ref).exists(), f"{f.relative_to(ROOT)} mentions {ref}, which does not exist"


def test_the_hpa_owns_the_replica_count_and_a_drain_never_takes_the_last_pod(overlay):
    _, objs = overlay
    # A `replicas:` in the Deployment resets the HPA's count on every apply.
    assert "replicas" not in by_kind(objs, "Deployment")["spec"]
    # PodDisruptionBudget maxUnavailable 1 with at least two replicas: a drain or a GPU rollout leaves one serving.
    assert by_kind(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert by_kind(objs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_the_gpu_engine_cache_outlives_a_pod(overlay):
    name, objs = overlay
    if name != "gpu":
        return
    spec = by_kind(objs, "Deployment")["spec"]["template"]["spec"]
    c, pvc = container(objs), by_kind(objs, "PersistentVolumeClaim")
    (vol,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica, on any node
    (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == vol["name"]]
    for var in ("DUALRATE_ENGINE_CACHE", "DUALRATE_ONNX_CACHE"):
        assert env(c)[var].startswith(mount + "/")


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
    rolling = by_kind(objs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    # CPU: a new pod first; GPU: no surge (it would need a spare GPU), one pod at a time instead.
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == ((0, 1) if overlay[0] == "gpu" else (1, 0))
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
    stats = PrometheusStats()
    stats.core_status(CoreStatus(ready=True, snapshot=SchedulerSnapshot(0, 0, 0, 4, 0, 0), metrics=CoreStats().metrics()),
                      "mnist-dualrate")
    assert 'dualrate_load_ratio{model="mnist-dualrate"}' in stats.exposition().decode()


def test_the_models_overlay_serves_a_read_only_repository_volume():
    """deploy/k8s/overlays/models: the claim mounted read-only where DUALRATE_MODEL_REPOSITORY points, the models
    named, the settings valid for the service (one thread per network: the CPU split between the two models)."""
    objs = render(K8S / "overlays" / "models")
    c, pod = container(objs), by_kind(objs, "Deployment")["spec"]["template"]["spec"]
    e = env(c)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert mount["readOnly"] and mount["mountPath"] == e["DUALRATE_MODEL_REPOSITORY"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["claimName"] == by_kind(objs, "PersistentVolumeClaim")["metadata"]["name"]
    models = e["DUALRATE_MODELS"].split(",")
    assert len(models) == 2 and all((ROOT / "checkpoints" / m / "model_card.json").is_file() for m in models)
    assert e["DUALRATE_THREADS"] == "1"


def test_the_api_keys_come_from_a_secret_and_a_missing_secret_stops_the_pod(overlay):
    """Issue 36: the manifests said nothing of keys. DUALRATE_API_KEYS is read from the Secret the README tells to
    create, never written in a manifest, and the reference is not optional (no Secret: no pod, not an open API)."""
    _, objs = overlay
    c = container(objs)
    assert "DUALRATE_API_KEYS" not in env(c)
    ref = secret_env(c)["DUALRATE_API_KEYS"]
    assert (ref["name"], ref["key"]) == ("dualrate-api-keys", "keys") and not ref.get("optional", False)
    assert not [o for o in objs if o["kind"] == "Secret"]  # no key ships in the repository
    readme = (K8S / "README.md").read_text()
    assert "kubectl create secret generic dualrate-api-keys --from-file=keys=" in readme


def test_the_ingress_serves_its_host_over_tls_to_the_service_port(overlay):
    _, objs = overlay
    ing, svc = by_kind(objs, "Ingress"), by_kind(objs, "Service")
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    (tls,) = ing["spec"]["tls"]
    assert tls["secretName"] and tls["hosts"] == [r["host"] for r in ing["spec"]["rules"]]
    (rule,) = ing["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    # The proxy waits for the longest request and passes server-sent events through unbuffered.
    ann = ing["metadata"]["annotations"]
    assert float(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > float(env(container(objs))["DUALRATE_MAX_TIMEOUT_S"])
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_the_network_policy_admits_only_the_ingress_controller_and_prometheus(overlay):
    _, objs = overlay
    pol = by_kind(objs, "NetworkPolicy")
    labels = by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = pol["spec"]["podSelector"]["matchLabels"]
    assert selector and all(labels.get(k) == v for k, v in selector.items())  # this app's pods, not the namespace's
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    sources = [f["namespaceSelector"]["matchLabels"] for f in rule["from"]]
    assert all(set(f) == {"namespaceSelector"} for f in rule["from"])  # no ipBlock, no pod-only rule
    assert sources == [{"kubernetes.io/metadata.name": "ingress-nginx"}, {"kubernetes.io/metadata.name": "monitoring"}]
    ((port),) = rule["ports"]
    assert port["port"] in {p["name"] for p in container(objs)["ports"]}


def test_the_readme_build_commands_are_complete_and_the_gpu_node_label_is_explained():
    """Issue 36: the README's `docker build --target cpu ...` lacked the build argument without which the build stops;
    the gpu overlay's nodeSelector label was not explained."""
    import re

    readme = (K8S / "README.md").read_text()
    builds = re.findall(r"docker build --target (\w+)((?:[^\n]*\\\n)*[^\n]*)", readme)
    assert {t for t, _ in builds} == {"cpu", "gpu"}
    needed = {"cpu": "--build-arg TORCH_INDEX_URL=", "gpu": "--build-arg GPU_TORCH_INDEX_URL="}
    dockerfile = (ROOT / "Dockerfile").read_text()
    for target, rest in builds:
        assert needed[target] in rest, (target, rest)
        assert f"ARG {needed[target].split()[1].rstrip('=')}" in dockerfile  # the argument the Dockerfile reads
    (selector,) = by_kind(render(K8S / "overlays" / "gpu"), "Deployment")["spec"]["template"]["spec"]["nodeSelector"]
    assert f"`{selector}=true`" in readme and "GPU Feature Discovery" in readme


def test_jobs_are_off_unless_the_replicas_share_a_postgres_store_from_a_secret(overlay):
    """Issue 39: an SQLite file per pod would show each job on one pod only; the jobs overlay gives every replica the
    PostgreSQL URL from a Secret (never written in a manifest)."""
    name, objs = overlay
    c = container(objs)
    if name != "jobs":
        assert env(c)["DUALRATE_JOB_STORE"] == "off"
        return
    assert "DUALRATE_JOB_STORE" not in env(c)
    ref = secret_env(c)["DUALRATE_JOB_STORE"]
    assert (ref["name"], ref["key"]) == ("dualrate-job-store", "url")
    assert float(env(c)["DUALRATE_JOB_LEASE_S"]) > 0
    readme = (K8S / "README.md").read_text()
    assert "kubectl create secret generic dualrate-job-store" in readme and "CloudNativePG" in readme
