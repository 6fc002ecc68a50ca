"""Moment matching distillation on the tiny preset: a few steps move the student's weights, the run resumes, and the
student is an ordinary checkpoint whose card's defaults (its steps, K, guidance 1) the sampler runs unchanged."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow  # trains networks


def test_distillation_moves_the_student_resumes_and_writes_an_ordinary_checkpoint(tmp_path):
    from dualrate.checkpoint import load_checkpoint, torch_fns
    from dualrate.diffusion import CosineSchedule
    from dualrate.distill import cli
    from dualrate.init import init_checkpoint
    from dualrate.sampler import dual_rate_sample

    teacher = init_checkpoint("tiny", tmp_path / "teacher", seed=4)
    args = ["--teacher", str(teacher), "--steps", "4", "--encoder-interval", "2", "--batch-size", "4",
            "--out", str(tmp_path / "run")]
    cli([*args, "--train-steps", "2"])
    first = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert first["step"] == 2
    cli([*args, "--train-steps", "3", "--checkpoint", str(tmp_path / "student")])  # resumes at 2, one more step
    st = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert st["step"] == 3 and len(st["history"]) == 0  # logs every 25 steps

    t = load_checkpoint(teacher)
    moved = [k for k, v in t.encoder.state_dict().items() if not torch.equal(v, st["student_encoder"][k])]
    assert moved, "the student's encoder did not move from the teacher's weights"
    assert any(not torch.equal(v, st["student_denoiser"][k]) for k, v in t.denoiser.state_dict().items())
    assert any(not torch.equal(v, st["aux_denoiser"][k]) for k, v in t.denoiser.state_dict().items())

    student = load_checkpoint(tmp_path / "student")
    card = json.loads((tmp_path / "student" / "model_card.json").read_text())
    assert card["defaults"] == {"steps": 4, "encoder_interval": 2, "guidance_scale": 1.0}
    assert card["distilled"]["teacher"] == "teacher" and card["distilled"]["train_steps"] == 3
    assert card["config"] == t.card["config"] and card["training"]["distilled"] is True
    d = student.defaults
    enc, den = torch_fns(student)
    imgs, stats = dual_rate_sample(enc, den, torch.tensor([1, 2]), [7, 8], d.steps, d.encoder_interval, d.guidance_scale,
                                   CosineSchedule(), student.cfg.null_label, sample_shape=student.cfg.sample_shape)
    assert imgs.shape == (2, *student.cfg.sample_shape) and stats.encoder_calls == 2
    with pytest.raises(SystemExit, match="no multiple"):
        cli(["--teacher", str(teacher), "--steps", "5", "--encoder-interval", "2", "--out", str(tmp_path / "bad")])


def test_the_student_is_evaluated_beside_its_teacher_on_the_same_seed_sets(tmp_path, tiny_student):
    """dualrate.evaluate_distilled on tiny checkpoints: the student at its distilled schedule (guidance 1), the teacher
    at that schedule (its guidance and 1.0) and at its defaults and K = 1; the teacher found from the student's card;
    FLOPs counted per row (the student's one network row per image against the guided teacher's two); both feature
    spaces judged; a rerun samples nothing."""
    from dualrate.config import MODEL_PRESETS
    from dualrate.evaluate_distilled import main
    from dualrate.nets import per_image_flops

    teacher, student = tiny_student
    out = tmp_path / "out"
    args = ["--student", str(student), "--num-images", "20", "--seed-sets", "2", "--out", str(out)]
    main(args)
    raw = json.loads((out / "distilled.json").read_text())
    rows = raw["rows"]
    settings = {role: (r["steps"], r["encoder_interval"], r["guidance_scale"]) for role, r in rows.items()}
    assert settings == {"student": (4, 2, 1.0), "teacher_few": (4, 2, 1.5), "teacher_few_g1": (4, 2, 1.0),
                        "teacher_default": (8, 4, 1.5), "teacher_k1": (8, 1, 1.5)}
    enc_f, den_f = per_image_flops(MODEL_PRESETS["tiny"])
    assert rows["student"]["gflops_per_image"] * 1e9 == pytest.approx(2 * enc_f + 4 * den_f)
    assert rows["teacher_default"]["gflops_per_image"] * 1e9 == pytest.approx(2 * (2 * enc_f + 8 * den_f))
    assert all(len(r["fids"]) == 2 and len(r["fids_gap"]) == 2 for r in rows.values())
    assert raw["teacher"] == str(teacher) and len(raw["teacher_sha256"]) == 64
    md = (out / "distilled.md").read_text()
    assert md.count("features: student") == 4 and "FLOPs per image:" in md
    assert (out / "distilled_grid.png").stat().st_size > 1000
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 5
    main(args)
    assert (out / "rows.jsonl").read_text().splitlines() == lines
    with pytest.raises(SystemExit, match="not a distilled student"):
        main(["--student", str(teacher), "--out", str(tmp_path / "bad")])


def test_the_verdicts_judge_each_target_by_the_spread():
    from dualrate.eval import SweepRow
    from dualrate.evaluate_distilled import verdicts

    def row(fid: float, std: float, gflops: float) -> SweepRow:
        return SweepRow(8, 2, 1.0, fid, 0.99, 4, gflops, 1.0, fid_std=std, fid_gap=fid / 10, fid_gap_std=std / 10)

    rows = {"student": row(12.0, 1.0, 1.0), "teacher_few": row(30.0, 2.0, 2.0), "teacher_few_g1": row(40, 2, 1.0),
            "teacher_default": row(10.0, 0.5, 4.0), "teacher_k1": row(9.5, 0.5, 16.0)}
    lines = verdicts(rows, ["cnn", "gap"])
    assert "= 0.250x (target <= 0.3x): met" in lines[0]
    assert "12.00 <= 1.25 x 10.00 + 0.50 = 13.00: met" in lines[1] and "clearly better" in lines[2]
    rows["student"] = row(13.5, 1.0, 1.3)
    lines = verdicts(rows, ["cnn"])
    assert lines[0].endswith("not met.") and lines[1].endswith("not met.")
    rows["student"] = row(27.5, 1.0, 1.0)  # 27.5 + 1 > 30 - 2: inside the spreads
    assert "not clearly better" in verdicts(rows, ["cnn"])[2]
