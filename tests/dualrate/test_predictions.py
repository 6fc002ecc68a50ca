"""Prediction types (a model card's diffusion.prediction): v, eps and x0 give the same x_hat for the same sample, and
the shipped v-model re-packaged as an eps- or x0-model (the conversion at its output) draws the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualrate.checkpoint import torch_fns
from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule, eps_from_v, q_sample, v_target, x_from_prediction, x_from_v
from dualrate.sampler import dual_rate_sample


def test_every_prediction_gives_back_the_data_it_was_made_from():
    sched = CosineSchedule(-12.0, 10.0)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(4, 3, 8, 12, generator=g) * 2 - 1, torch.randn(4, 3, 8, 12, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    x, eps = x.double(), eps.double()
    z = q_sample(x, t, sched, eps)
    for prediction, pred in (("v", v_target(x, eps, t, sched)), ("eps", eps), ("x0", x)):
        assert torch.allclose(x_from_prediction(z, pred, t, sched, prediction), x, atol=1e-9), prediction
    with pytest.raises(ValueError, match="not one of v, eps, x0"):
        x_from_prediction(z, eps, t, sched, "epsilon")


LABELS, SEEDS, STEPS, K, G = torch.arange(10), list(range(100, 110)), 12, 4, 1.5


@pytest.fixture(scope="module")
def v_images(model):
    encode, denoise = torch_fns(model)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    ref, _ = dual_rate_sample(encode, denoise, LABELS, SEEDS, STEPS, K, G, sched, model.cfg.null_label,
                              sample_shape=model.cfg.sample_shape)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_the_v_model_repackaged_draws_the_same_images(model, v_images, prediction):
    encode, denoise = torch_fns(model)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    convert = eps_from_v if prediction == "eps" else x_from_v

    def denoise_other(z, t, tau, y, feats):
        return convert(z, denoise(z, t, tau, y, feats), t, sched)

    ref = v_images
    got, _ = dual_rate_sample(encode, denoise_other, LABELS, SEEDS, STEPS, K, G, sched, model.cfg.null_label,
                              sample_shape=model.cfg.sample_shape, prediction=prediction)
    a = to_uint8(ref, model.cfg.output_size).astype(int)
    b = to_uint8(got, model.cfg.output_size).astype(int)
    diff = np.abs(a - b)
    assert (diff <= 1).mean() >= 0.99, f"{(diff <= 1).mean():.4f} of pixels within 1/255"
    print(f"{prediction}: {(diff == 0).mean():.4f} equal, {(diff <= 1).mean():.4f} within 1/255, max {diff.max()}")
