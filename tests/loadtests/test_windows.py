"""loadtests.windows: the bare loop, a warm service and (--core) its scheduler in-process, in turn over the same images;
and the old `loadtests.service_bench --windows` (and --pairs, --saturation) commands forward to their modules."""

from __future__ import annotations

import json

import pytest

from loadtests import service_bench, windows


@pytest.mark.slow
@pytest.mark.parametrize("client", ["httpx", "lean"])
def test_alternating_windows_measure_both_sides_over_the_same_images_and_record_them(checkpoint_dir, onnx_dir,
                                                                                    tmp_path, client):
    out = tmp_path / "bench.md"
    windows.main(["--checkpoint", str(checkpoint_dir), "--slots", "2", "--windows", "2", "--window-batches", "1",
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


@pytest.mark.parametrize(("flag", "module"), [("--windows", "windows"), ("--pairs", "interleaved"),
                                              ("--saturation", "saturation")])
def test_the_old_service_bench_modes_forward_to_their_modules(monkeypatch, flag, module):
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(f"loadtests.{module}"), "main", seen.append)
    argv = ["--slots", "2", flag, "3", "--out", "x.md"]
    service_bench.main(argv)
    assert seen == [argv]
