"""loadtests.stream_cost: its window accounting, and one short run against a real server."""

from __future__ import annotations

import json

import pytest

from loadtests import stream_cost


def test_windows_alternate_abba():
    assert stream_cost.arms(3) == ["control", "streams", "streams", "control", "control", "streams"]


def test_a_request_counts_in_a_window_by_the_share_of_its_computation_inside_it():
    assert stream_cost.overlap(0.0, 2.0, 1.0, 5.0) == pytest.approx(0.5)
    assert stream_cost.overlap(2.0, 3.0, 1.0, 5.0) == pytest.approx(1.0)
    assert stream_cost.overlap(5.0, 6.0, 1.0, 5.0) == 0.0
    answer = {"timings": {"queue_ms": 500.0, "compute_ms": 1000.0}, "images": [{}, {}]}
    assert stream_cost.computed(10.0, answer, "plain") == (10.5, 11.5, "plain", 2)


@pytest.mark.slow
def test_a_short_run_measures_both_arms_and_records_them(checkpoint_dir, onnx_dir, tmp_path):
    out = tmp_path / "bench.md"
    stream_cost.main(["--checkpoint", str(checkpoint_dir), "--pairs", "2", "--window", "5", "--settle", "2.5",
                      "--warmup", "2", "--client-nice", "0", "--out", str(out)])
    run = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    windows = run["windows"]
    assert [w["arm"] for w in windows] == ["control", "streams", "streams", "control"]
    for w in windows:
        assert w["plain_images_per_s"] > 0 and w["all_images_per_s"] > w["plain_images_per_s"]
        # previews come only from the requests sent in the streams windows (counted by the window that sent them)
        assert (w["previews"] > 0) == (w["arm"] == "streams")
    assert len(run["plain_ratios"]) == 2 and run["mean_plain_ratio_ci95"][1] <= run["mean_plain_ratio_ci95"][2]
    assert "95% confidence interval" in out.read_text()
