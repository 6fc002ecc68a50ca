"""The shipped MNIST pair re-packaged as an "onnx" model of another prediction (the conversion from v inside the
denoiser's graph): served through the same engine and sampler path, its images match the v-model's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dualrate.data import to_uint8
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from export.card import read_spec

SEEDS = list(range(100, 108))


class Converted(torch.nn.Module):
    """The shipped denoiser with its v turned into eps (= sigma z + alpha v) or x0 (= alpha z - sigma v), alpha and
    sigma of the cosine schedule computed in the graph from t (float32, as the exported graph runs them)."""

    def __init__(self, denoiser: torch.nn.Module, prediction: str, logsnr_min: float, logsnr_max: float) -> None:
        super().__init__()
        self.net, self.prediction = denoiser, prediction
        self.t_min, self.t_max = math.atan(math.exp(-0.5 * logsnr_max)), math.atan(math.exp(-0.5 * logsnr_min))

    def forward(self, z, t, tau, label, f0, f1, f2):
        v = self.net(z, t, tau, label, f0, f1, f2)
        logsnr = -2.0 * torch.log(torch.tan(self.t_min + t * (self.t_max - self.t_min)))
        alpha = torch.sigmoid(logsnr).sqrt()[:, None, None, None]
        sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
        return sigma * z + alpha * v if self.prediction == "eps" else alpha * z - sigma * v


def repackage(model, folder, prediction: str):
    """A model folder of format "onnx": the shipped encoder as exported, the denoiser converted to `prediction`."""
    cfg = model.cfg
    folder.mkdir(parents=True)
    b = 2
    z, t, tau = torch.randn(b, *cfg.sample_shape), torch.rand(b), torch.rand(b)
    y = torch.tensor([1, cfg.null_label])
    with torch.no_grad():
        feats = model.encoder(z, tau, y)
    names = ["f0", "f1", "f2"]
    dyn = {0: "b"}
    torch.onnx.export(model.encoder, (z, tau, y), str(folder / "encoder.onnx"), input_names=["z", "tau", "label"],
                      output_names=names, dynamic_axes={n: dyn for n in ["z", "tau", "label", *names]},
                      opset_version=17, dynamo=False)
    den = Converted(model.denoiser, prediction, cfg.logsnr_min, cfg.logsnr_max).eval()
    den_in = ["z", "t", "tau", "label", *names]
    torch.onnx.export(den, (z, t, tau, y, *feats), str(folder / "denoiser.onnx"), input_names=den_in,
                      output_names=["pred"], dynamic_axes={n: dyn for n in [*den_in, "pred"]}, opset_version=17,
                      dynamo=False)
    s = cfg.image_size
    card = {"format": "onnx",
            "sample": {"channels": cfg.channels, "height": s, "width": s, "output_height": cfg.output_size,
                       "output_width": cfg.output_size},
            "classes": {"count": cfg.num_classes, "null_label": cfg.null_label},
            "diffusion": {"schedule": {"kind": "cosine", "logsnr_min": cfg.logsnr_min, "logsnr_max": cfg.logsnr_max},
                          "prediction": prediction, "time_input": "t"},
            "encoder": {"inputs": {"z": "z", "time": "tau", "label": "label"}, "outputs": names},
            "denoiser": {"inputs": {"z": "z", "time": "t", "encoder_time": "tau", "label": "label", "features": names},
                         "output": "pred"},
            "defaults": {k: model.card["defaults"][k] for k in ("steps", "encoder_interval", "guidance_scale")}}
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    return folder


def images(engine, spec) -> np.ndarray:
    d = spec.defaults
    labels = torch.arange(len(SEEDS)) % spec.num_classes
    x, _ = dual_rate_sample(engine.encode, engine.denoise, labels, SEEDS, d.steps, d.encoder_interval,
                            d.guidance_scale, spec.schedule(), spec.null_label, sample_shape=spec.sample_shape,
                            prediction=spec.diffusion.prediction)
    return to_uint8(x, spec.output_hw).astype(int)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_the_mnist_pair_repackaged_as_another_prediction_draws_the_same_images(model, checkpoint_dir, engine,
                                                                               tmp_path, prediction):
    folder = repackage(model, tmp_path / f"mnist-{prediction}", prediction)
    spec = read_spec(folder)
    assert spec.diffusion.prediction == prediction
    v_images = images(engine, read_spec(checkpoint_dir))  # the shipped v-model on ONNX Runtime (the session engine)
    other = create_engine(folder, backend="onnxruntime", device="cpu", max_batch=32)
    try:
        got = images(other, spec)
    finally:
        other.close()
    diff = np.abs(got - v_images)
    within = float((diff <= 1).mean())
    print(f"{prediction}: {within:.5f} of the pixels within 1/255 of the v-model's, max {diff.max()}/255")
    assert within >= 0.99, f"{within:.4f} of the pixels within 1/255 (max {diff.max()})"
    # A sampler that ignored the card's prediction would treat the eps/x0 output as v: far from the v-model's images.
    wrong = images(create_engine(folder, backend="onnxruntime", device="cpu", max_batch=32),
                   type(spec)(**{**vars(spec), "diffusion": type(spec.diffusion)(**{**vars(spec.diffusion),
                                                                                     "prediction": "v"})}))
    assert float((np.abs(wrong - v_images) <= 1).mean()) < 0.9
