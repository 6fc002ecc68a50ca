"""deploy/prometheus/alerts.yml: its unit tests pass under `promtool test rules`, the compose Prometheus loads it, and
every series and outcome it reads is one the service exports (a rule on a misspelt series never fires)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.core import CoreStats, CoreStatus, Outcome, SchedulerSnapshot
from service.metrics import PrometheusStats

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must test the alert rules: promtool missing (scripts/install_test_tools.sh)")
        pytest.skip("promtool is not installed (make test installs Debian's prometheus)")
    return path


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_the_alert_rules_pass_their_unit_tests():
    out = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=PROM, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert has at least one test in which it fires (an alert never shown firing may never fire).
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert fired == {r["alert"] for r in rules() if "alert" in r}


def test_the_issue_asks_for_these_alerts_with_severities():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(alerts) == {"DualRateEngineCoreDown", "DualRateNoReadyReplica", "DualRateHighErrorRatio",
                           "DualRateHighRejectionRatio", "DualRateLatencyBudgetBurnFast",
                           "DualRateLatencyBudgetBurnSlow"}
    assert all(a["labels"]["severity"] in {"critical", "warning"} and a["annotations"]["summary"]
               for a in alerts.values())


def test_the_rules_read_only_series_and_outcomes_the_service_exports():
    stats = PrometheusStats()
    stats.set_model("mnist", 10, None)
    stats.core_status(CoreStatus(ready=True, snapshot=SchedulerSnapshot(0, 0, 0, 4, 0, 0),
                                 metrics=CoreStats().metrics()), "mnist")
    stats.core.ready = True
    exposed = set(re.findall(r"^(dualrate_\w+?)(?:\{| )", stats.exposition().decode(), re.M))
    assert {"dualrate_ready", "dualrate_engine_core_up"} <= exposed
    exprs = " ".join(str(r["expr"]) for r in rules())
    read = set(re.findall(r"\b(dualrate_\w+)", exprs))
    assert read and read <= exposed, read - exposed
    outcomes = {o for group in re.findall(r'outcome=~?"([^"]+)"', exprs) for o in group.split("|")}
    assert outcomes and outcomes <= {o.value for o in Outcome}, outcomes - {o.value for o in Outcome}
    # Every recording rule a rule reads is defined.
    recorded = {r["record"] for r in rules() if "record" in r}
    assert set(re.findall(r"\b(dualrate:\w+:\w+)", exprs)) == recorded


def test_the_compose_prometheus_loads_the_rules():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.split(":")[:2] == ["./deploy/prometheus", "/etc/prometheus"] for m in mounts), mounts
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    out = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=PROM, capture_output=True, text=True)
    assert out.returncode == 0 and "alerts.yml" in out.stdout + out.stderr, out.stdout + out.stderr
