"""A foreign dual-rate pair (tests/export/foreign.py: not dualrate.nets; eps-prediction, two feature tensors of
different shapes, non-square 8x12 samples cropped to 8x10, a log-SNR range of its own) served by a real server from
its model folder: its images equal a reference ancestral sampler run directly on the same graphs."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import dual_rate_sample
from tests.export.foreign import CLASSES, C, H, W, write_model

LOGSNR = (-10.0, 8.0)  # not the cosine schedule's default range
REQUEST = {"class_label": 2, "num_images": 3, "seed": 11, "steps": 12, "encoder_interval": 3, "guidance_scale": 2.0}
UNCONDITIONAL = {"class_label": None, "num_images": 2, "seed": 40, "steps": 7, "encoder_interval": 2}


def variant(tmp_path_factory, fmt: str, time_input: str):
    """A model folder of the foreign pair (the same weights in every variant: write_model seeds them)."""
    diffusion = {"schedule": {"kind": "cosine", "logsnr_min": LOGSNR[0], "logsnr_max": LOGSNR[1]},
                 "prediction": "eps", "time_input": time_input}
    folder = tmp_path_factory.mktemp(f"{fmt}-{time_input}") / "foreign"
    return write_model(folder, fmt, card_override={"diffusion": diffusion})


def reference(folder, time_input: str, req: dict) -> np.ndarray:
    """dual_rate_sample on the ONNX graphs themselves (ONNX Runtime, fed by the names the test wrote), eps-prediction,
    the card's schedule; -> the delivered pictures (B, 8, 10, 3)."""
    import onnxruntime as ort

    sched = CosineSchedule(*LOGSNR)
    enc = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    den = ort.InferenceSession(str(folder / "denoiser.onnx"), providers=["CPUExecutionProvider"])

    def time(t: torch.Tensor) -> np.ndarray:
        return (sched.logsnr(t.float()) if time_input == "logsnr" else t.float()).numpy()

    def encode(z, tau, label):
        out = enc.run(["h_lo", "h_hi"], {"x_in": z.numpy(), "t_in": time(tau), "y": label.numpy()})
        return tuple(torch.from_numpy(o) for o in out)

    def denoise(z, t, tau, label, feats):
        feeds = {"x_in": z.numpy(), "t_in": time(t), "tau_in": time(tau), "y": label.numpy(),
                 "h_lo": feats[0].numpy(), "h_hi": feats[1].numpy()}
        return torch.from_numpy(den.run(["eps_out"], feeds)[0])

    n, seed = req["num_images"], req["seed"]
    label = CLASSES if req["class_label"] is None else req["class_label"]
    x, _ = dual_rate_sample(encode, denoise, torch.full((n,), label), [seed + i for i in range(n)], req["steps"],
                            req["encoder_interval"], req.get("guidance_scale", 2.0), sched, CLASSES,
                            sample_shape=(C, H, W), prediction="eps")
    return to_uint8(x, (H, W - 2))


def served(server, req: dict) -> np.ndarray:
    r = httpx.post(f"{server.url}/generate", json=req, timeout=60)
    assert r.status_code == 200, r.text
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))))
                     for i in r.json()["images"]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {(fmt, ti): variant(tmp_path_factory, fmt, ti)
            for fmt in ("onnx", "torch-export") for ti in ("t", "logsnr")}


@pytest.mark.parametrize("time_input", ["t", "logsnr"])
def test_a_foreign_onnx_model_serves_the_reference_samplers_images(start_server, folders, time_input):
    folder = folders["onnx", time_input]
    server = start_server(checkpoint=folder, max_active_images=4, max_images_per_request=4)
    info = httpx.get(f"{server.url}/v1/model").json()["image"]
    assert (info["height"], info["width"], info["output_height"], info["output_width"]) == (H, W, H, W - 2)
    assert (info["format"], info["prediction"], info["time_input"]) == ("onnx", "eps", time_input)
    for req in (REQUEST, UNCONDITIONAL):
        got, want = served(server, req), reference(folder, time_input, req)
        assert got.shape == want.shape == (req["num_images"], H, W - 2, 3)
        assert np.array_equal(got, want), f"max |service - reference| = {np.abs(got.astype(int) - want).max()}/255"


@pytest.mark.parametrize("time_input", ["t", "logsnr"])
def test_the_torch_export_program_serves_within_one_level_of_the_onnx_path(start_server, folders, time_input):
    """The same weights as torch.export programs on the torch backend (DUALRATE_BACKEND=auto resolves to torch for
    this format on the CPU): within 1/255 of the ONNX Runtime path's images, for the same seeds."""
    server = start_server(checkpoint=folders["torch-export", time_input], backend="auto", max_active_images=4,
                          max_images_per_request=4)
    assert httpx.get(f"{server.url}/v1/model").json()["backend"] == "torch"
    for req in (REQUEST, UNCONDITIONAL):
        got, want = served(server, req), reference(folders["onnx", time_input], time_input, req)
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).max() <= 1


def test_a_model_without_classes_refuses_labels_and_guidance(start_server, tmp_path_factory):
    """An unconditional card (no classes): its networks take no label; a class_label or a guidance scale other than
    1 is a 422 naming the field, a plain request is served."""
    from tests.export.foreign import Denoiser, Encoder

    class Unlabelled(torch.nn.Module):  # the pair with the label input fixed to the null label inside
        def __init__(self, net: torch.nn.Module, encoder: bool) -> None:
            super().__init__()
            self.net, self.encoder = net, encoder

        def forward(self, *a):
            y = torch.full_like(a[1], CLASSES, dtype=torch.long)
            return self.net(a[0], a[1], y) if self.encoder else self.net(a[0], a[1], a[2], y, *a[3:])

    folder = tmp_path_factory.mktemp("uncond") / "uncond"
    folder.mkdir()
    torch.manual_seed(0)
    enc, den = Unlabelled(Encoder(), True).eval(), Unlabelled(Denoiser(), False).eval()
    x, t = torch.randn(2, C, H, W), torch.rand(2)
    with torch.no_grad():
        feats = enc(x, t)
    dyn = {0: "b"}
    torch.onnx.export(enc, (x, t), str(folder / "encoder.onnx"), input_names=["x", "t"], output_names=["a", "b"],
                      dynamic_axes={n: dyn for n in ("x", "t", "a", "b")}, opset_version=17, dynamo=False)
    torch.onnx.export(den, (x, t, t, *feats), str(folder / "denoiser.onnx"), input_names=["x", "t", "tau", "a", "b"],
                      output_names=["eps"], dynamic_axes={n: dyn for n in ("x", "t", "tau", "a", "b", "eps")},
                      opset_version=17, dynamo=False)
    import json

    from tests.export.foreign import card

    c = card(encoder={"inputs": {"z": "x", "time": "t"}, "outputs": ["a", "b"]},
             denoiser={"inputs": {"z": "x", "time": "t", "encoder_time": "tau", "features": ["a", "b"]}, "output": "eps"},
             defaults={"steps": 6, "encoder_interval": 2, "guidance_scale": 1.0})
    del c["classes"]
    (folder / "model_card.json").write_text(json.dumps(c))
    server = start_server(checkpoint=folder, max_active_images=4, max_images_per_request=4)
    assert httpx.get(f"{server.url}/v1/model").json()["image"]["num_classes"] == 0
    ok = httpx.post(f"{server.url}/generate", json={"num_images": 2, "seed": 3}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 2
    for body, field in (({"class_label": 1}, "class_label"), ({"guidance_scale": 2.0}, "guidance_scale")):
        r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        assert r.status_code == 422, r.text
        assert field in r.text and "unconditional" in r.text
