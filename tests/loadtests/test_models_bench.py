"""loadtests.models on a very short run: one service of two models, the probed model's latency measured idle and
under a flood of the other, the report and the raw latencies written side by side."""

from __future__ import annotations

import json

import pytest

from loadtests import models


@pytest.mark.slow
def test_a_short_run_measures_the_probed_model_idle_and_under_the_flood(tmp_path):
    out = tmp_path / "models.md"
    models.main(["--seconds", "4", "--flooded", "mnist-dualrate-8step", "--probed", "mnist-dualrate-8step-copy",
                 "--repository", str(repository(tmp_path)), "--out", str(out)])
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    assert raw["idle_latencies_s"] and raw["flood_latencies_s"] and raw["capacity_rps"] > 0
    assert raw["flooded_statuses"] and set(raw["flooded_statuses"]) <= {200, 429}
    assert raw["summary"]["p99_flood_over_idle"] > 0
    assert "| p99 under the flood / idle p99 |" in out.read_text()


def repository(tmp_path):
    """Two cheap models (the 8-step student, twice under two names): a short run of the benchmark's whole path."""
    import shutil

    from tests.conftest import ROOT

    repo = tmp_path / "repo"
    for name in ("mnist-dualrate-8step", "mnist-dualrate-8step-copy"):
        shutil.copytree(ROOT / "checkpoints" / "mnist-dualrate-8step", repo / name)
    return repo
