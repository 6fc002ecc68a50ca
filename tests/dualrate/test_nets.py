import pytest
import torch

from dualrate.config import MNIST_GEOMETRY, MODEL_PRESETS, ModelConfig
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


def test_standalone_model_is_a_pair_whose_encoder_does_nothing():
    """A standalone baseline: no encoder weights, zero features, and a network blind to tau and the features, so K
    changes neither its output nor its FLOPs."""
    from dualrate.nets import standalone_config

    cfg = standalone_config(TINY, "large")
    assert cfg.kind == "standalone" and cfg.denoiser == TINY.encoder
    torch.manual_seed(0)
    enc, den = ContextEncoder(cfg).eval(), LightDenoiser(cfg).eval()
    for p in den.parameters():  # trained weights are not zero; the identity-initialised layers would hide tau/e
        torch.nn.init.normal_(p, 0.0, 0.05)
    assert not list(enc.parameters())
    z, t, y = torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([1, 5, 10])
    with torch.no_grad():
        feats = enc(z, t, y)
        assert [tuple(f.shape) for f in feats] == [(3, 1, 1, 1)] * 3 and not any(f.any() for f in feats)
        v = den(z, t, t, y, *feats)
        other = den(z, t, (t + 0.3).clamp(max=1), y, *(torch.randn_like(f) for f in feats))
        assert torch.equal(v, other)
        assert not torch.equal(v, den(z, t * 0.5, t, y, *feats))  # it does see t
    enc_f, den_f = per_image_flops(cfg)
    assert enc_f == 0 and abs(den_f / per_image_flops(TINY)[0] - 1) < 0.05  # the encoder's U-ViT plus the head


def test_standalone_small_matches_the_pairs_flops_per_step_at_k4():
    from dualrate.nets import standalone_config

    for preset in ("tiny", "mnist-small"):
        pair_enc, pair_den = per_image_flops(MODEL_PRESETS[preset])
        small = per_image_flops(standalone_config(MODEL_PRESETS[preset], "small"))[1]
        assert abs(small / (pair_enc / 4 + pair_den) - 1) < 0.1, (preset, small, pair_enc / 4 + pair_den)
    with pytest.raises(ValueError, match="large' or 'small"):
        standalone_config(TINY, "medium")


def test_unknown_model_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        ModelConfig(**MNIST_GEOMETRY, kind="single")
