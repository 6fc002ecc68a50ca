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
