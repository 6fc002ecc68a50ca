"""loadtests.overload --repeat on a very short run: one service, the capacity, then a fixed and an auto arm at 2x it,
each arm's figures, its queue and K over time, and the auto / fixed ratio recorded beside the report and its plot."""

from __future__ import annotations

import json

import pytest

from loadtests import overload


@pytest.mark.slow
def test_a_short_repeated_run_measures_both_arms_and_records_them(tmp_path):
    out = tmp_path / "overload.md"
    overload.main(["--repeat", "1", "--arm-seconds", "3", "--capacity-seconds", "3", "--slots", "8", "--out",
                   str(out)])
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    (run,) = raw["runs"]
    assert raw["capacity_rps"] > 0 and raw["target_s"] == 4.0 and raw["admission"] == "on"
    for arm in ("fixed", "auto"):
        f = run[arm]["figures"]
        assert f["requests"] > 0 and f["ok"] + f["refused_429"] + f["timeouts_504"] + f["other"] == f["requests"]
        assert run[arm]["samples"] and {"queue", "k_mean", "client_cpu_s"} <= set(run[arm]["samples"][0])
    assert run["fixed"]["figures"]["mean_k"] == 4
    assert raw["ratio"]["min"] == raw["ratio"]["median"] == raw["ratio"]["max"] == run["ratio"]
    assert (tmp_path / "overload_repeat_2x_on.png").stat().st_size > 0
    assert "| run | fixed goodput /s |" in out.read_text()
