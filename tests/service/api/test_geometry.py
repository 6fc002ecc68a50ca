"""Any geometry from the checkpoint: the same seeds give the same pictures from the reference sampler, the CLI and
the service over real HTTP, for the shipped MNIST checkpoint, a random 3x16x16 `tiny-rgb` one and a random standalone
(no-encoder) `tiny` one, on both CPU backends; RGB models answer RGB PNGs of the card's size."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dualrate.checkpoint import load_checkpoint
from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.init import init_checkpoint
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from engines.sample import main as sample_cli

pytestmark = pytest.mark.slow  # real servers

REQ = {"class_label": 2, "num_images": 3, "steps": 6, "encoder_interval": 2, "guidance_scale": 1.5, "seed": 77}


@pytest.fixture(scope="module")
def tiny_rgb(tmp_path_factory):
    return init_checkpoint("tiny-rgb", tmp_path_factory.mktemp("ck") / "tiny-rgb", seed=3)


@pytest.fixture(scope="module")
def tiny_standalone(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny-standalone", seed=4, standalone="large")


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("which", ["shipped", "tiny-rgb", "tiny-standalone"])
def test_reference_cli_and_service_agree(which, backend, checkpoint_dir, tiny_rgb, tiny_standalone, start_server,
                                         tmp_path):
    ck = {"shipped": checkpoint_dir, "tiny-rgb": tiny_rgb, "tiny-standalone": tiny_standalone}[which]
    cfg = load_checkpoint(ck).cfg
    engine = create_engine(ck, backend=backend, device="cpu", max_batch=16)
    sched = CosineSchedule(cfg.logsnr_min, cfg.logsnr_max)
    x, _ = dual_rate_sample(engine.encode, engine.denoise, torch.full((3,), REQ["class_label"]), [77, 78, 79],
                            REQ["steps"], REQ["encoder_interval"], REQ["guidance_scale"], sched, cfg.null_label,
                            sample_shape=cfg.sample_shape)
    ref = to_uint8(x, cfg.output_size).astype(int)
    engine.close()
    want = (cfg.output_size, cfg.output_size) if cfg.channels == 1 else (cfg.output_size, cfg.output_size, 3)
    assert ref.shape[1:] == want

    sample_cli(["--checkpoint", str(ck), "--backend", backend, "--class-label", "2", "--num-images", "3",
                "--steps", "6", "--encoder-interval", "2", "--guidance-scale", "1.5", "--seed", "77",
                "--out", str(tmp_path)])
    cli = np.stack([np.asarray(Image.open(tmp_path / f"2_seed{s}.png")) for s in (77, 78, 79)]).astype(int)
    assert np.abs(cli - ref).max() <= 1

    srv = start_server(checkpoint=ck, backend=backend, max_active_images=4, max_images_per_request=4)
    r = httpx.post(f"{srv.url}/generate", json=REQ, timeout=60)
    assert r.status_code == 200, r.text
    pics = [decode(im["png_base64"]) for im in r.json()["images"]]
    assert all(p.mode == ("L" if cfg.channels == 1 else "RGB") and p.size == (cfg.output_size,) * 2 for p in pics)
    served = np.stack([np.asarray(p) for p in pics]).astype(int)
    assert np.abs(served - ref).max() <= 1
    info = httpx.get(f"{srv.url}/v1/model").json()["image"]
    s, o = cfg.image_size, cfg.output_size
    assert info == {"channels": cfg.channels, "sample_size": s, "output_size": o, "height": s, "width": s,
                    "output_height": o, "output_width": o, "png_mode": "L" if cfg.channels == 1 else "RGB",
                    "num_classes": cfg.num_classes, "class_names": None, "format": "dualrate", "prediction": "v",
                    "time_input": "t"}
