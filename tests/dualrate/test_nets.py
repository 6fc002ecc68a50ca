import pytest
import torch

from dualrate.config import MODEL_PRESETS, ModelConfig
from dualrate.nets import ContextEncoder, LightDenoiser, per_image_flops

TINY = MODEL_PRESETS["tiny"]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_shapes_for_any_batch_size(batch):
    torch.manual_seed(0)
    enc, den = ContextEncoder(TINY).eval(), LightDenoiser(TINY).eval()
    z = torch.randn(batch, 1, 32, 32)
    t, tau = torch.rand(batch), torch.rand(batch)
    y = torch.randint(0, 11, (batch,))
    with torch.no_grad():
        feats = enc(z, tau, y)
        assert [tuple(f.shape[1:]) for f in feats] == TINY.feature_shapes
        assert all(f.shape[0] == batch for f in feats)
        v = den(z, t, tau, y, *feats)
    assert v.shape == (batch, 1, 32, 32)
    assert torch.isfinite(v).all()


def test_rows_are_independent():
    """A row's output does not depend on the other rows of the batch (no batch statistics)."""
    torch.manual_seed(0)
    enc = ContextEncoder(TINY).eval()
    z, tau, y = torch.randn(4, 1, 32, 32), torch.rand(4), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        full = enc(z, tau, y)
        one = enc(z[2:3], tau[2:3], y[2:3])
    for a, b in zip(full, one, strict=True):
        assert torch.allclose(a[2:3], b, atol=1e-5)


def test_light_network_is_cheap():
    enc, den = per_image_flops(MODEL_PRESETS["mnist-small"])
    assert den <= 0.15 * enc, (enc, den)


def test_config_round_trips_through_dict():
    cfg = MODEL_PRESETS["mnist-small"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
