"""loadtests.soak on a very short run: both processes' RSS sampled, the slope fitted, the report and the raw samples
written side by side."""

from __future__ import annotations

import json

import pytest

from loadtests import soak


def test_slope_is_mb_per_minute_after_the_warm_up():
    samples = [{"t": t, "core_mb": 500 + (0 if t < 60 else 2 * (t - 60) / 60)} for t in range(0, 601, 60)]
    assert soak.slope(samples, "core_mb", 60) == pytest.approx(2.0)
    assert soak.slope(samples[:1], "core_mb", 0) == 0.0


@pytest.mark.slow
def test_a_short_soak_samples_both_processes_and_records_them(checkpoint_dir, onnx_dir, tmp_path):
    out = tmp_path / "soak.md"
    assert soak.main(["--checkpoint", str(checkpoint_dir), "--minutes", "0.15", "--warmup-minutes", "0.05",
                      "--sample-s", "3", "--clients", "2", "--streams", "1", "--slots", "2", "--out", str(out)]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    assert len(raw["samples"]) >= 3 and all(s["front_mb"] > 0 and s["core_mb"] > 0 for s in raw["samples"])
    assert raw["answered"]["plain"] > 0 and raw["answered"]["streams"] > 0 and raw["answered"]["errors"] == 0
    assert set(raw["result"]) == {"front", "core"} and out.with_suffix(".png").stat().st_size > 0
    assert "| engine core |" in out.read_text()
