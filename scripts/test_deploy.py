"""`make test-deploy`: build the CPU image from a clean clone and run it for real, as a user would.

1. starts a Docker engine and local stand-ins for the base images (shared/docker/local-docker.sh; nothing is pulled);
2. clones the repository's HEAD into a temporary folder and builds the `cpu` target from it (classic builder,
   `--network host`), recording the build time and the image size;
3. runs it with a read-only root filesystem and a tmpfs at /tmp, waits for Docker's health status `healthy`,
   gets PNGs from POST /generate, checks the process runs as non-root and that the start exported no ONNX;
4. `docker stop` with a request in flight: the request completes (200) and the container exits 0;
5. serves your own models from a mounted model repository: a random tiny-rgb checkpoint (`python -m dualrate.init`)
   and a foreign ONNX pair, mounted read-only into the
   read-only container, exported into the tmpfs, answered as 16x16 RGB PNGs;
6. brings up the compose `cpu` profile (service + Prometheus, local images) with DUALRATE_API_KEYS set in the shell,
   waits until Prometheus scrapes the service (`up == 1`), and checks the key reached the container (401 without it,
   200 with it);
7. stops and removes everything it started (and the Docker engine, if it started it).

Figures go to stdout and, as JSON, to --out (default artifacts/test-deploy.json).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from loadtests.process import free_port, metric  # noqa: E402

# The workplace's script that starts a Docker engine and local base images: $LOCAL_DOCKER, else ../shared beside the
# checkout, else the workplace's shared folder (a clone elsewhere, e.g. CI's fresh clone in a temporary folder).
_CANDIDATES = [os.environ.get("LOCAL_DOCKER", ""), ROOT.parent / "shared" / "docker" / "local-docker.sh",
               Path("/work/shared/docker/local-docker.sh")]
LOCAL_DOCKER = next((Path(c) for c in _CANDIDATES if c and Path(c).is_file()), Path(_CANDIDATES[1]))
TAG = "dualrate:cpu-deploytest"
NAME = "dualrate-deploytest"
PROJECT = "dualratedeploytest"


def log(msg: str) -> None:
    print(f"[test-deploy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True, env: dict | None = None, cwd: Path | None = None,
       capture: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=capture, text=True, env=env, cwd=cwd, timeout=timeout)
    if check and p.returncode != 0:
        out = (p.stdout or "")[-4000:] + (p.stderr or "")[-4000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{out}")
    return p


def local_docker(step: str) -> None:
    sh("bash", str(LOCAL_DOCKER), step, capture=False)


def local_env() -> dict[str, str]:
    out = sh("bash", str(LOCAL_DOCKER), "env").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise TimeoutError(f"{what} not reached after {timeout:.0f} s (last: {last!r})")


class Deploy:
    def __init__(self, docker: str, env: dict[str, str]) -> None:
        self.docker, self.env = docker, env
        self.results: dict = {}

    def d(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        return sh(self.docker, *args, check=check, timeout=timeout)

    def build(self, src: Path) -> None:
        log(f"building the cpu target from a clean clone ({src})")
        t0 = time.monotonic()
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        sh(self.docker, "build", "--network", "host", "--target", "cpu",
           "--build-arg", f"PYTHON_IMAGE={self.env['LOCAL_PYTHON_IMAGE']}",
           "--build-arg", f"TORCH_INDEX_URL={self.env['LOCAL_TORCH_INDEX_URL']}",
           "-t", TAG, ".", cwd=src, env=env)
        self.results["build_seconds"] = round(time.monotonic() - t0, 1)
        size = int(self.d("image", "inspect", "-f", "{{.Size}}", TAG).stdout.strip())
        self.results["image_bytes"] = size
        torch_v = self.d("run", "--rm", "--entrypoint", "python", TAG, "-c",
                         "import torch; print(torch.__version__, torch.version.cuda)").stdout.strip()
        self.results["torch_in_image"] = torch_v
        log(f"built {TAG} in {self.results['build_seconds']} s: {size / 1e9:.2f} GB, torch {torch_v}")
        assert torch_v.endswith("None") and "+cpu" in torch_v, f"the CPU image must carry the CPU build: {torch_v}"
        # `pip install .` without extras: serving needs no load generator, plots or progress bars. (httpx is serving's
        # own since the job webhooks: service.jobs.webhooks.)
        tooling = self.d("run", "--rm", "--entrypoint", "python", TAG, "-c",
                         "import importlib.util as u; print(' '.join(m for m in ('locust', 'matplotlib', 'scipy', "
                         "'tqdm', 'pytest') if u.find_spec(m)))").stdout.strip()
        assert not tooling, f"the CPU image carries tooling it never runs: {tooling}"

    def run_container(self) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"running {TAG} read-only (tmpfs /tmp) on port {port}")
        self.d("rm", "-f", NAME, check=False)
        self.d("run", "-d", "--name", NAME, "--network", "host", "--read-only", "--tmpfs", "/tmp",
               "--stop-timeout", "150", "-e", f"DUALRATE_PORT={port}", "-e", "DUALRATE_MAX_ACTIVE_IMAGES=4",
               "-e", "DUALRATE_MAX_IMAGES_PER_REQUEST=4", TAG)
        t0 = time.monotonic()

        def healthy() -> str | None:
            st = self.d("inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", NAME).stdout.split()
            if st[0] != "running":
                raise RuntimeError(f"container {st[0]}:\n{self.d('logs', NAME, check=False).stderr[-4000:]}")
            return "healthy" if st[1] == "healthy" else None

        wait_for("Docker health status healthy", healthy, 240, every=1.0)
        self.results["seconds_to_healthy"] = round(time.monotonic() - t0, 1)
        log(f"healthy after {self.results['seconds_to_healthy']} s")

        r = httpx.post(f"{url}/generate", json={"class_label": 7, "num_images": 2, "steps": 8, "encoder_interval": 4,
                                                "seed": 1}, timeout=120)
        assert r.status_code == 200, r.text
        pngs = [base64.b64decode(im["png_base64"]) for im in r.json()["images"]]
        assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
        log("POST /generate: 2 PNGs")
        # The demo page and the offline docs' assets are in the installed package (package data).
        for path, marker in (("/", "demo.js"), ("/static/demo.js", "generate/stream"),
                             ("/static-docs/swagger-ui-bundle.js", "SwaggerUIBundle")):
            page = httpx.get(f"{url}{path}", timeout=30)
            assert page.status_code == 200 and marker in page.text, (path, page.status_code)
        with httpx.stream("POST", f"{url}/generate/stream", json={"class_label": 2, "steps": 8, "seed": 1,
                                                                   "preview_every": 4}, timeout=120) as st:
            events = [line for line in st.iter_lines() if line.startswith("event:")]
        assert events[0] == "event: queued" and "event: preview" in events and events[-1] == "event: done", events
        log("demo page, offline docs assets, and a stream with previews")

        uid = self.d("exec", NAME, "id", "-u").stdout.strip()
        proc_uid = self.d("exec", NAME, "sh", "-c", "awk '/^Uid:/{print $2}' /proc/1/status").stdout.strip()
        assert uid != "0" and proc_uid != "0", (uid, proc_uid)
        self.results["uid"] = int(proc_uid)
        logs = self.d("logs", NAME).stdout + self.d("logs", NAME).stderr
        assert "already in" in logs and "exporting" not in logs, f"the start re-exported ONNX:\n{logs[-3000:]}"
        assert "telemetry" not in logs.lower(), f"onnxruntime's telemetry line is back:\n{logs[-3000:]}"
        graphs = self.d("exec", NAME, "sh", "-c", "ls /app/artifacts/onnx/*/").stdout.split()
        assert graphs and not [g for g in graphs if "fp16" in g], f"the CPU image carries fp16 graphs: {graphs}"
        log(f"runs as uid {proc_uid}; the start reused the build-time ONNX export (fp32 graphs only: {graphs}); no "
            "telemetry line")

        # docker stop with a request in flight: SIGTERM drains, the request completes, the exit code is 0.
        box: dict = {}

        def long_request() -> None:
            try:
                box["r"] = httpx.post(f"{url}/generate", json={"class_label": 3, "num_images": 1, "steps": 200,
                                                               "encoder_interval": 1, "seed": 2}, timeout=150)
            except httpx.HTTPError as e:
                box["r"] = e

        th = threading.Thread(target=long_request)
        th.start()
        wait_for("the long request running", lambda: metric(httpx.get(f"{url}/metrics").text,
                                                            "dualrate_active_images") >= 1, 30, every=0.05)
        t0 = time.monotonic()
        self.d("stop", "-t", "150", NAME)
        th.join(150)
        r = box.get("r")
        assert isinstance(r, httpx.Response) and r.status_code == 200, f"in-flight request lost: {r!r}"
        stop_log = self.d("logs", NAME).stderr
        assert "draining" in stop_log and "drained; shutting down" in stop_log, stop_log[-3000:]
        code = self.d("inspect", "-f", "{{.State.ExitCode}}", NAME).stdout.strip()
        assert code == "0", f"exit code {code}:\n{self.d('logs', NAME).stderr[-3000:]}"
        self.results["stop_seconds_with_request_in_flight"] = round(time.monotonic() - t0, 1)
        log(f"docker stop with a request in flight: it completed (200), exit 0, "
            f"{self.results['stop_seconds_with_request_in_flight']} s")
        self.d("rm", "-f", NAME)

    def own_model(self) -> None:
        """The README's "serve your own model", as a model repository: a random tiny-rgb checkpoint written on the host
        by dualrate.init and a foreign ONNX pair (tests/export/foreign.py: eps, 8x12 samples) in one folder, mounted
        read-only into the read-only container (DUALRATE_MODEL_REPOSITORY); the checkpoint is exported into the tmpfs
        and served as 3x16x16 RGB, the foreign graphs run in place."""
        folder = Path(tempfile.mkdtemp(prefix="dualrate-own-"))
        folder.chmod(0o755)  # the container's user (uid 10001) must reach the checkpoint
        sh(sys.executable, "-m", "dualrate.init", "--preset", "tiny-rgb", "--out", str(folder / "tiny-rgb"), cwd=ROOT)
        sh(sys.executable, "-c", f"from pathlib import Path; from tests.export.foreign import write_model; "
           f"write_model(Path({str(folder / 'foreign')!r}))", cwd=ROOT)
        for path in folder.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"running {TAG} read-only with a mounted model repository (tiny-rgb, foreign) on port {port}")
        self.d("rm", "-f", NAME, check=False)
        self.d("run", "-d", "--name", NAME, "--network", "host", "--read-only", "--tmpfs", "/tmp",
               "-v", f"{folder}:/models:ro", "-e", "DUALRATE_MODEL_REPOSITORY=/models",
               "-e", "DUALRATE_MODELS=tiny-rgb,foreign",
               "-e", f"DUALRATE_PORT={port}", TAG)

        def ready() -> bool:
            st = self.d("inspect", "-f", "{{.State.Status}}", NAME).stdout.strip()
            if st != "running":
                raise RuntimeError(f"container {st}:\n{self.d('logs', NAME, check=False).stderr[-4000:]}")
            try:
                return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the own model ready", ready, 240, every=1.0)
        image = httpx.get(f"{url}/v1/model", timeout=30).json()["image"]
        assert (image["channels"], image["output_size"], image["png_mode"]) == (3, 16, "RGB"), image
        r = httpx.post(f"{url}/generate", json={"model": "tiny-rgb", "class_label": 1, "steps": 4, "seed": 1},
                       timeout=120)
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["images"][0]["png_base64"])
        assert png[12:16] == b"IHDR" and int.from_bytes(png[16:20], "big") == 16 and png[25] == 2, png[:32]  # RGB
        logs = self.d("logs", NAME).stderr
        assert "exporting to /tmp/dualrate-onnx" in logs, logs[-3000:]
        listing = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["name"] for m in listing["models"]] == ["tiny-rgb", "foreign"], listing
        r = httpx.post(f"{url}/generate", json={"model": "foreign", "class_label": 1, "seed": 1}, timeout=120)
        assert r.status_code == 200 and r.json()["model"] == "foreign", r.text
        png = base64.b64decode(r.json()["images"][0]["png_base64"])
        assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (10, 8), png[:32]
        self.results["own_model_served"] = True
        self.results["model_repository_served"] = True
        log("a mounted model repository: the tiny-rgb checkpoint exported into the tmpfs, served as 16x16 RGB PNGs; "
            "the foreign ONNX pair served in place as 10x8")
        self.d("rm", "-f", NAME)
        shutil.rmtree(folder, ignore_errors=True)

    def compose(self, src: Path) -> None:
        port, prom_port = free_port(), free_port()
        # A key set in the shell must reach the container (compose passes every DUALRATE_* setting the user sets).
        key = "deploytest-key"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("DUALRATE_")},
               "DUALRATE_CPU_IMAGE": TAG, "PROMETHEUS_IMAGE": self.env["LOCAL_PROMETHEUS_IMAGE"],
               "DUALRATE_HOST_PORT": str(port), "PROMETHEUS_HOST_PORT": str(prom_port), "DUALRATE_API_KEYS": key}
        base = ["docker-compose", "-p", PROJECT, "--profile", "cpu"]
        log(f"compose --profile cpu up (service on {port}, Prometheus on {prom_port})")
        try:
            sh(*base, "up", "-d", "--no-build", cwd=src, env=env)
            running = self.d("ps", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format",
                             '{{.Label "com.docker.compose.service"}}').stdout.split()
            assert sorted(running) == ["dualrate-cpu", "prometheus"], f"expected the service and Prometheus alone: {running}"

            def scraped() -> bool:
                try:
                    q = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": 'up{job="dualrate"}'},
                                  timeout=3).json()
                except (httpx.HTTPError, ValueError):
                    return False
                res = q.get("data", {}).get("result", [])
                return bool(res) and res[0]["value"][1] == "1"

            t0 = time.monotonic()
            wait_for('Prometheus up{job="dualrate"} == 1', scraped, 240, every=2.0)
            self.results["compose_seconds_to_scraped"] = round(time.monotonic() - t0, 1)
            log(f"Prometheus scrapes the service: up == 1 after {self.results['compose_seconds_to_scraped']} s")
            url = f"http://127.0.0.1:{port}"
            wait_for("the compose service ready", lambda: httpx.get(f"{url}/health/ready", timeout=3).status_code == 200,
                     240, every=1.0)
            body = {"class_label": 1, "steps": 4, "seed": 1}
            without = httpx.post(f"{url}/generate", json=body, timeout=60)
            assert without.status_code == 401, f"compose service without the key: {without.status_code} {without.text}"
            keyed = httpx.post(f"{url}/generate", json=body, headers={"authorization": f"Bearer {key}"}, timeout=120)
            assert keyed.status_code == 200, keyed.text
            self.results["compose_key_enforced"] = True
            log("compose passes DUALRATE_API_KEYS: 401 without the key, 200 with it")
        except Exception:
            print(sh(*base, "logs", "--tail", "60", cwd=src, env=env, check=False).stdout[-6000:], file=sys.stderr)
            raise
        finally:
            sh(*base, "down", "-v", "--timeout", "30", cwd=src, env=env, check=False)


def main() -> int:
    p = argparse.ArgumentParser(prog="python scripts/test_deploy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "test-deploy.json")
    p.add_argument("--keep-image", action="store_true", help="leave the built image in the local engine")
    a = p.parse_args()
    if not LOCAL_DOCKER.is_file():
        print(f"test-deploy needs {LOCAL_DOCKER} (set LOCAL_DOCKER to the shared local-docker.sh)", file=sys.stderr)
        return 2
    probe = subprocess.run(["bash", "-c", "docker info"], capture_output=True)
    engine_was_up = probe.returncode == 0
    for step in ("start", "base", "prometheus", "torch-index"):
        local_docker(step)
    env = local_env()
    deploy = Deploy(env["DOCKER"], env)
    commit = sh("git", "rev-parse", "HEAD", cwd=ROOT).stdout.strip()
    deploy.results.update({"date": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": commit,
                           "machine": f"{os.uname().machine}, {os.cpu_count()} CPU cores"})
    try:
        with tempfile.TemporaryDirectory(prefix="dualrate-deploy-") as tmp:
            src = Path(tmp) / "src"
            sh("git", "clone", "--quiet", str(ROOT), str(src))
            deploy.build(src)
            deploy.run_container()
            deploy.own_model()
            deploy.compose(src)
    finally:
        deploy.d("rm", "-f", NAME, check=False)
        if not a.keep_image:
            deploy.d("rmi", "-f", TAG, check=False)
        if not engine_was_up:
            log("stopping the Docker engine this run started")
            local_docker("stop")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(deploy.results, indent=2) + "\n")
    log(f"all checks passed: {json.dumps(deploy.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
