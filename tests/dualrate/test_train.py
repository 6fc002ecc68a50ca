"""Training runs, checkpoints and resumes (tiny preset, a few steps)."""

import shutil
from dataclasses import replace

import pytest
import torch

from dualrate.config import MODEL_PRESETS, TrainConfig
from dualrate.nets import LightDenoiser
from dualrate.train import main, sample_tau

pytestmark = pytest.mark.slow  # real servers / training / the evaluator: `pytest -m "not slow"` skips them


def test_gap_sampling_covers_zero_small_and_wide_gaps():
    cfg = TrainConfig()
    t = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    tau = sample_tau(t, cfg, torch.Generator().manual_seed(1))
    gap = tau - t
    assert (gap >= 0).all() and (tau <= 1).all()
    assert 0.15 < (gap == 0).float().mean() < 0.25
    assert (gap > 0.5).any()  # K close to N is covered too


def test_train_checkpoints_and_resumes(tmp_path, monkeypatch):
    import dualrate.train as train

    cfg = replace(TrainConfig(), preset="tiny", batch_size=8, steps=6, checkpoint_every=2, warmup_steps=1)
    main(cfg, tmp_path / "straight", tmp_path / "ck")  # reference: 6 steps in one go
    straight = torch.load(tmp_path / "straight" / "state.pt", weights_only=False)
    assert straight["step"] == 6
    assert (tmp_path / "ck" / "encoder.safetensors").is_file()
    assert (tmp_path / "straight" / "training_options.json").is_file()

    # The same run, interrupted during step 5 (after the state of step 4 was saved), then started again.
    real_update, calls = train.ema_update, []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 9:  # two EMA updates per step: the first of step 5
            raise KeyboardInterrupt
        real_update(*args)

    monkeypatch.setattr(train, "ema_update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(cfg, tmp_path / "run", None)
    monkeypatch.setattr(train, "ema_update", real_update)
    st = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert st["step"] == 4
    main(cfg, tmp_path / "run", None)  # resumes at 4, runs 2 more
    resumed = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert resumed["step"] == 6
    # 4 + 2 resumed steps land where 6 straight steps do: weights, EMA, optimizer and data order carried over.
    for net in ("encoder", "denoiser", "ema_encoder", "ema_denoiser"):
        for k, v in straight[net].items():
            assert torch.allclose(resumed[net][k], v, atol=1e-6), f"{net}.{k} differs after resume"

    # And the saved state is what the resume starts from: perturb it, and the result moves with it (a trainer that
    # ignored state.pt and retrained from scratch would land on the straight run again).
    shutil.copytree(tmp_path / "run", tmp_path / "tampered", ignore=shutil.ignore_patterns("state.pt"))
    st["encoder"]["net.stem.weight"] = st["encoder"]["net.stem.weight"] + 0.05
    torch.save(st, tmp_path / "tampered" / "state.pt")
    main(cfg, tmp_path / "tampered", None)
    tampered = torch.load(tmp_path / "tampered" / "state.pt", weights_only=False)
    assert tampered["step"] == 6
    diff = (tampered["encoder"]["net.stem.weight"] - straight["encoder"]["net.stem.weight"]).abs().min().item()
    assert diff > 0.01


def test_training_refuses_to_overwrite_the_shipped_checkpoint(tmp_path):
    from dualrate.checkpoint import DEFAULT_CHECKPOINT
    from dualrate.train import cli

    before = (DEFAULT_CHECKPOINT / "encoder.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        cli(["--out", str(tmp_path / "run"), "--checkpoint", str(DEFAULT_CHECKPOINT), "--preset", "tiny", "--steps", "1"])
    assert not (tmp_path / "run" / "state.pt").exists()
    assert (DEFAULT_CHECKPOINT / "encoder.safetensors").stat().st_mtime_ns == before


def test_standalone_option_trains_a_baseline_with_the_same_recipe(tmp_path):
    """`--standalone small` on the tiny preset: same loop and data order, a checkpoint the sampler loads, whose card
    says what it is and whose K changes nothing."""
    from dualrate.checkpoint import load_checkpoint, torch_fns
    from dualrate.diffusion import CosineSchedule
    from dualrate.nets import per_image_flops
    from dualrate.sampler import dual_rate_sample
    from dualrate.train import cli

    cli(["--preset", "tiny", "--standalone", "small", "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "run"),
         "--checkpoint", str(tmp_path / "ck")])
    st = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert st["step"] == 3 and not st["encoder"]
    model = load_checkpoint(tmp_path / "ck")
    card = model.card
    assert card["kind"] == model.cfg.kind == "standalone" and card["training"]["standalone"] == "small"
    assert card["flops_per_forward"]["encoder"] == 0 and card["defaults"]["encoder_interval"] == 1
    pair_enc, pair_den = per_image_flops(MODEL_PRESETS["tiny"])
    assert abs(card["flops_per_forward"]["denoiser"] / (pair_enc / 4 + pair_den) - 1) < 0.1
    # The three steps trained the network: its weights left their initialisation (train seeds torch with 0).
    torch.manual_seed(0)
    init = LightDenoiser(model.cfg).state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in st["denoiser"].items())
    enc, den = torch_fns(model)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    args = (torch.tensor([3, 7]), [5, 6], 8)
    shape = model.cfg.sample_shape
    a, sa = dual_rate_sample(enc, den, *args, 1, 1.5, sched, model.cfg.null_label, sample_shape=shape)
    b, sb = dual_rate_sample(enc, den, *args, 4, 1.5, sched, model.cfg.null_label, sample_shape=shape)
    assert torch.equal(a, b) and sa.encoder_calls != sb.encoder_calls


def test_training_on_fashion_mnist_writes_its_class_names_into_the_card(tmp_path, monkeypatch):
    """`--dataset fashion-mnist` on the tiny preset, from a folder of IDX files the test writes: the card says which
    data set and names its classes (the service shows them); a preset of another geometry is refused."""
    import json

    import numpy as np

    from dualrate.data import DATASETS
    from dualrate.train import cli
    from tests.dualrate.test_datasets import write_idx

    rng = np.random.default_rng(1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 16, dtype=np.uint8), compress=True)
    monkeypatch.setenv("DUALRATE_FASHION_MNIST_DIR", str(tmp_path))
    cli(["--preset", "tiny", "--dataset", "fashion-mnist", "--steps", "3", "--batch-size", "4", "--out",
         str(tmp_path / "run"), "--checkpoint", str(tmp_path / "ck"), "--snapshot-every", "2"])
    card = json.loads((tmp_path / "ck" / "model_card.json").read_text())
    assert card["data"]["class_names"] == list(DATASETS["fashion-mnist"].class_names)
    assert card["training"]["dataset"] == "fashion-mnist" and card["training"]["trained_steps"] == 3
    # --snapshot-every: the EMA weights at step 2 as an ordinary checkpoint (the training curves evaluate them),
    # differing from the final ones; none at the final step (that is --checkpoint).
    from dualrate.checkpoint import load_checkpoint

    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["step-00002"]
    snap, final = load_checkpoint(tmp_path / "run" / "snapshots" / "step-00002"), load_checkpoint(tmp_path / "ck")
    assert snap.card["training"]["trained_steps"] == 2 and snap.card["data"]["class_names"] == card["data"]["class_names"]
    assert any(not torch.equal(v, final.encoder.state_dict()[k]) for k, v in snap.encoder.state_dict().items())
    with pytest.raises(SystemExit, match="draws"):
        cli(["--preset", "tiny-rgb", "--dataset", "fashion-mnist", "--steps", "1", "--out", str(tmp_path / "rgb")])
