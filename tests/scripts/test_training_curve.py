"""scripts/training_curve.py on a tiny run with snapshots: one point per snapshot and the final checkpoint, in
training order, with the report, its raw JSON and the plot."""

import json

import pytest

from tests.scripts import load_script

pytestmark = pytest.mark.slow  # trains and evaluates


def test_training_curve_evaluates_every_snapshot_and_the_final_checkpoint(tmp_path, keeps_autograd):
    """In this process: the evaluator's statistics are shared with the other tests."""
    from dualrate.train import cli

    cli(["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--snapshot-every", "2", "--out",
         str(tmp_path / "run"), "--checkpoint", str(tmp_path / "ck")])
    out = tmp_path / "curve.md"
    load_script("training_curve").main([f"tiny-pair={tmp_path / 'run'}:{tmp_path / 'ck'}", "--num-images", "20",
                                        "--steps", "4", "--out", str(out)])
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    points = raw["curves"]["tiny-pair"]
    assert [p["trained_steps"] for p in points] == [2, 4]
    assert points[1]["checkpoint"] == str(tmp_path / "ck") and points[0]["row"]["fid"] != points[1]["row"]["fid"]
    assert set(raw["checkpoints"]) == {p["checkpoint"] for p in points} and raw["git_commit"]
    assert "| tiny-pair | 2 | 4 | 4 |" in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 5_000


def test_the_plot_keeps_the_models_of_earlier_runs_in_the_same_report(tmp_path):
    """A second command into the same report (standalone-large hours after the pair) plots both: every model this run
    did not evaluate comes from the raw JSON's latest run that did; a model evaluated again is this run's."""
    mod = load_script("training_curve")

    def pt(steps: int, fid: float) -> dict:
        return {"trained_steps": steps, "row": {"fid": fid}}

    raw = tmp_path / "curve.json"
    runs = [{"curves": {"pair": [pt(1, 9.0)]}}, {"curves": {"pair": [pt(1, 8.0)], "small": [pt(1, 7.0)]}}]
    raw.write_text(json.dumps({"runs": runs}))
    merged = mod.with_earlier_curves({"large": [pt(2, 5.0)], "small": [pt(2, 6.0)]}, raw)
    assert merged == {"pair": [pt(1, 8.0)], "large": [pt(2, 5.0)], "small": [pt(2, 6.0)]}
    assert mod.with_earlier_curves({"large": []}, tmp_path / "none.json") == {"large": []}
