"""scripts/training_curve.py on a tiny run with snapshots: one point per snapshot and the final checkpoint, in
training order, with the report, its raw JSON and the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains and evaluates

ROOT = Path(__file__).resolve().parents[2]


def test_training_curve_evaluates_every_snapshot_and_the_final_checkpoint(tmp_path):
    from dualrate.train import cli

    cli(["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--snapshot-every", "2", "--out",
         str(tmp_path / "run"), "--checkpoint", str(tmp_path / "ck")])
    out = tmp_path / "curve.md"
    subprocess.run([sys.executable, "scripts/training_curve.py", f"tiny-pair={tmp_path / 'run'}:{tmp_path / 'ck'}",
                    "--num-images", "20", "--steps", "4", "--out", str(out)], cwd=ROOT, check=True, timeout=300)
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    points = raw["curves"]["tiny-pair"]
    assert [p["trained_steps"] for p in points] == [2, 4]
    assert points[1]["checkpoint"] == str(tmp_path / "ck") and points[0]["row"]["fid"] != points[1]["row"]["fid"]
    assert set(raw["checkpoints"]) == {p["checkpoint"] for p in points} and raw["git_commit"]
    assert "| tiny-pair | 2 | 4 | 4 |" in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 5_000
