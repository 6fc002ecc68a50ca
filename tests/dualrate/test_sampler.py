import math

import pytest
import torch

from dualrate.checkpoint import torch_fns
from dualrate.config import MODEL_PRESETS
from dualrate.diffusion import CosineSchedule
from dualrate.nets import ContextEncoder, LightDenoiser
from dualrate.sampler import dual_rate_sample

TINY = MODEL_PRESETS["tiny"]


@pytest.fixture(scope="module")
def fns():
    torch.manual_seed(0)
    enc, den = ContextEncoder(TINY).eval(), LightDenoiser(TINY).eval()
    for p in den.out.parameters():  # zero-initialised output layer: give it weights so v is not trivially 0
        torch.nn.init.normal_(p, std=0.1)
    calls = {"encode": 0}

    def encode(z, tau, y):
        calls["encode"] += 1
        return tuple(enc(z, tau, y))

    def denoise(z, t, tau, y, f):
        return den(z, t, tau, y, *f)

    return encode, denoise, calls


@pytest.mark.parametrize(("steps", "k"), [(8, 1), (8, 3), (8, 8), (7, 4)])
def test_encoder_runs_every_kth_step(fns, steps, k):
    encode, denoise, calls = fns
    calls["encode"] = 0
    _, stats = dual_rate_sample(encode, denoise, torch.tensor([1, 2]), [0, 1], steps, k, 1.0, CosineSchedule(), 10,
                                sample_shape=TINY.sample_shape)
    assert calls["encode"] == stats.encoder_calls == math.ceil(steps / k)
    assert stats.denoiser_calls == steps


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_same_seed_same_image_whatever_else_is_in_the_batch(fns, guidance):
    encode, denoise, _ = fns
    sched = CosineSchedule()
    alone, _ = dual_rate_sample(encode, denoise, torch.tensor([3]), [42], 6, 2, guidance, sched, 10, sample_shape=TINY.sample_shape)
    crowd, _ = dual_rate_sample(encode, denoise, torch.tensor([7, 3, 10, 0]), [5, 42, 9, 1], 6, 2, guidance, sched, 10,
                                sample_shape=TINY.sample_shape)
    assert torch.allclose(alone[0], crowd[1], atol=1e-5)
    other, _ = dual_rate_sample(encode, denoise, torch.tensor([3]), [43], 6, 2, guidance, sched, 10, sample_shape=TINY.sample_shape)
    assert not torch.allclose(alone, other)


def test_zeroed_features_control_never_calls_the_encoder(fns):
    encode, denoise, calls = fns
    calls["encode"] = 0
    imgs, stats = dual_rate_sample(encode, denoise, torch.tensor([1]), [0], 5, 1, 1.0, CosineSchedule(), 10, sample_shape=TINY.sample_shape,
                                   feature_shapes=TINY.feature_shapes)
    assert calls["encode"] == 0 and stats.encoder_calls == 0
    assert imgs.shape == (1, 1, 32, 32) and imgs.abs().max() <= 1


def test_checkpoint_round_trip_samples_identically(tmp_path):
    from dualrate.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(1)
    enc, den = ContextEncoder(TINY).eval(), LightDenoiser(TINY).eval()
    save_checkpoint(tmp_path, enc, den, {"config": TINY.to_dict(), "defaults": {"steps": 4}})
    m = load_checkpoint(tmp_path)
    assert m.defaults.steps == 4
    a, _ = dual_rate_sample(*torch_fns(m), torch.tensor([2]), [0], 4, 2, 1.5, CosineSchedule(), 10, sample_shape=TINY.sample_shape)
    b, _ = dual_rate_sample(lambda z, t, y: tuple(enc(z, t, y)), lambda z, t, tau, y, f: den(z, t, tau, y, *f),
                            torch.tensor([2]), [0], 4, 2, 1.5, CosineSchedule(), 10, sample_shape=TINY.sample_shape)
    assert torch.equal(a, b)


def test_counter_noise_is_standard_normal_and_independent_of_the_batch():
    from dualrate.sampler import draw_noise

    z = draw_noise(list(range(500)), [0] * 500, (1, 32, 32))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.05  # Gaussian kurtosis
    alone = draw_noise([42], [3], (3, 16, 16))[0]
    crowd = draw_noise([7, 42, 9], [1, 3, 3], (3, 16, 16))
    assert torch.equal(alone, crowd[1])
    assert not torch.equal(crowd[1], crowd[2])  # another seed
    assert not torch.equal(alone, draw_noise([42], [4], (3, 16, 16))[0])  # another step
    assert torch.isfinite(draw_noise([2**53 - 1], [0], (1, 8, 8))).all()


def test_a_refresh_schedule_replaces_the_fixed_interval(fns):
    encode, denoise, calls = fns
    args = (encode, denoise, torch.tensor([1, 2]), [0, 1], 8)
    fixed, _ = dual_rate_sample(*args, 4, 1.5, CosineSchedule(), 10, sample_shape=TINY.sample_shape)
    same, _ = dual_rate_sample(*args, 1, 1.5, CosineSchedule(), 10, sample_shape=TINY.sample_shape, refresh_steps=[0, 4])
    assert torch.equal(fixed, same)  # the schedule of K = 4 gives K = 4's images
    calls["encode"] = 0
    switched, stats = dual_rate_sample(*args, 1, 1.5, CosineSchedule(), 10, sample_shape=TINY.sample_shape, refresh_steps=[0, 2, 4])
    assert calls["encode"] == stats.encoder_calls == 3 and not torch.equal(switched, fixed)
