"""loadtests.service_bench --windows: the bare loop, a warm service and (--core) its scheduler in-process, in turn over
the same images."""

from __future__ import annotations

import json

import pytest

from loadtests import service_bench


@pytest.mark.slow
@pytest.mark.parametrize("client", ["httpx", "lean"])
def test_alternating_windows_measure_both_sides_over_the_same_images_and_record_them(checkpoint_dir, onnx_dir,
                                                                                    tmp_path, client):
    out = tmp_path / "bench.md"
    service_bench.main(["--checkpoint", str(checkpoint_dir), "--slots", "2", "--windows", "2", "--window-batches", "1",
                        "--core", "--client", client, "--out", str(out)])
    run = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    assert run["client"] == client and run["window_images"] == 2 and [w["window"] for w in run["windows"]] == [1, 2]
    for w in run["windows"]:
        assert w["bare_images_per_s"] > 0 and w["service_images_per_s"] > 0
        assert w["ratio"] == pytest.approx(w["service_images_per_s"] / w["bare_images_per_s"])
        assert w["core_images_per_s"] > 0 and w["core_ratio"] == pytest.approx(w["core_images_per_s"] / w["bare_images_per_s"])
    ratios = sorted(w["ratio"] for w in run["windows"])
    assert run["median_ratio"] == pytest.approx((ratios[0] + ratios[1]) / 2)
    assert run["median_core_ratio"] == pytest.approx(sorted(w["core_ratio"] for w in run["windows"])[1] / 2
                                                     + sorted(w["core_ratio"] for w in run["windows"])[0] / 2)
    assert "**Median service / bare:" in out.read_text() and "median core / bare" in out.read_text()
