"""A real service, a real Prometheus scraping it and evaluating the shipped alert rules, load, and every PromQL
expression of the dashboard returns data."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from loadtests.process import free_port, wait_until_ok

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dualrate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prometheus(start_server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (make test installs Debian's package)")
    srv = start_server(max_active_images=4, max_images_per_request=4, queue_size=2)
    tmp = tmp_path_factory.mktemp("prom")
    cfg = tmp / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ALERTS}\n"
        "scrape_configs:\n  - job_name: dualrate\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{srv.port}']\n"
    )
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "prometheus.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ok(f"{url}/-/ready", 20.0, proc):
        proc.kill()
        pytest.fail("prometheus did not become ready: " + (tmp / "prometheus.log").read_text()[-2000:])
    yield url, srv
    proc.terminate()
    proc.wait(10)


async def drive_load(base: str, seconds: float) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        stop = time.monotonic() + seconds
        i = 0
        while time.monotonic() < stop:
            burst = [c.post("/generate", json={"class_label": (i + j) % 10, "num_images": 1 + j % 2, "steps": 8,
                                               "encoder_interval": 1 + j % 4, "seed": i + j}) for j in range(8)]
            burst.append(c.post("/generate", json={"class_label": 42}))  # invalid, counted apart
            await asyncio.gather(*burst)  # 8 at once against queue_size 2: some get 429
            i += 8


def test_every_dashboard_query_returns_data(prometheus):
    url, srv = prometheus
    asyncio.run(drive_load(srv.url, 12.0))
    time.sleep(3)  # a few more scrapes
    dash = json.loads(DASHBOARD.read_text())
    # The model variable as Grafana sends it with "All" picked (its allValue); the dashboard declares it.
    (variable,) = dash["templating"]["list"]
    assert variable["name"] == "model" and variable["includeAll"] and variable["allValue"] == ".*"
    exprs = [t["expr"].replace("$model", variable["allValue"]) for p in dash["panels"] for t in p.get("targets", [])]
    assert sum('model=~"$model"' in t["expr"] for p in dash["panels"] for t in p.get("targets", [])) >= 10
    empty = []
    for expr in exprs:
        r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", (expr, r)
        values = [float(s["value"][1]) for s in r["data"]["result"]]
        if not values or all(math.isnan(v) for v in values):
            empty.append(expr)
    assert not empty, f"dashboard queries without data: {empty}"
    # Prometheus saw the rejections and the invalid requests as their own outcomes.
    r = httpx.get(f"{url}/api/v1/query", params={"query": "sum by (outcome) (dualrate_requests_total)"}).json()
    by_outcome = {s["metric"]["outcome"]: float(s["value"][1]) for s in r["data"]["result"]}
    assert by_outcome["ok"] > 0 and by_outcome["invalid_request"] > 0 and by_outcome["queue_full"] > 0
    # The shipped alert rules evaluate against the real series: no rule in error, the recorded latency ratio has a
    # value for the model, the healthy replica is ready with its core up, and nothing fires.
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = [r for g in groups for r in g["rules"]]
    assert len(evaluated) == 10 and all(r["health"] == "ok" for r in evaluated), evaluated
    assert not [r["name"] for r in evaluated if r.get("state") == "firing"]
    for query in ("dualrate:slow_ratio:rate5m", "dualrate_ready", "dualrate_engine_core_up"):
        r = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()
        values = [float(v["value"][1]) for v in r["data"]["result"]]
        assert values and not any(math.isnan(v) for v in values), (query, r)
        if query != "dualrate:slow_ratio:rate5m":
            assert values == [1.0], (query, values)
