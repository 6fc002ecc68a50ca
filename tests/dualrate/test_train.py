"""Training runs, checkpoints and resumes (tiny preset, a few steps)."""

from dataclasses import replace

import torch

from dualrate.config import TrainConfig
from dualrate.train import main, sample_tau


def test_gap_sampling_covers_zero_small_and_wide_gaps():
    cfg = TrainConfig()
    t = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    tau = sample_tau(t, cfg, torch.Generator().manual_seed(1))
    gap = tau - t
    assert (gap >= 0).all() and (tau <= 1).all()
    assert 0.15 < (gap == 0).float().mean() < 0.25
    assert (gap > 0.5).any()  # K close to N is covered too


def test_train_checkpoints_and_resumes(tmp_path):
    cfg = replace(TrainConfig(), preset="tiny", batch_size=8, steps=4, checkpoint_every=2, warmup_steps=1)
    main(cfg, tmp_path / "run", tmp_path / "ck")
    st = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert st["step"] == 4
    assert (tmp_path / "ck" / "encoder.safetensors").is_file()
    assert (tmp_path / "run" / "training_options.json").is_file()
    main(replace(cfg, steps=6), tmp_path / "run", None)  # resumes at 4, runs 2 more
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 6
