"""scripts/gpu_run.sh --dry-run: every GPU check's code path on the CPU (tiny preset), so no device minute goes to a
harness bug."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_run_dry_run_measures_every_check(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "GPU_CHECK_TIMEOUT": "300"}
    out = subprocess.run(["bash", "scripts/gpu_run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry_run"] is True and not [k for k in res if k.endswith("_error")], res
    for key in ("quality_compiled_bf16_max_pixel_diff_vs_eager_fp32", "bare_rgb64_fp32_k4_images_per_s",
                "bare_rgb64_k4_over_k1", "service_rgb64_images_per_s", "service_rgb64_vs_bare",
                "bare_mnist_fp32_graphs_k4_images_per_s", "service_mnist_vs_bare", "git_commit",
                "rgb64_checkpoint_sha256"):
        assert key in res, key
    assert res["service_rgb64_images_per_s"] > 0 and res["service_rgb64_exit_code"] == 0
    assert res["foreign_torch_export_eager"] and res["foreign_max_pixel_diff_vs_onnxruntime"] <= 1
    assert (tmp_path / "gpu_check.md").is_file()
