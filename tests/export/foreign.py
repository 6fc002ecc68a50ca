"""A foreign dual-rate pair for the model-repository tests: an architecture written here, not `dualrate.nets`
(eps-prediction, two feature tensors of different shapes, non-square samples), exported to ONNX and to torch.export
with a model card of the contract (export/card.py). `write_model` makes a folder; keyword arguments plant defects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

C, H, W = 3, 8, 12  # non-square samples
CLASSES = 5


class Encoder(nn.Module):
    """(x, t, y) -> h_lo (B, 6, H/2, W/2), h_hi (B, 4, H, W)."""

    def __init__(self, batch_dependent: bool = False, nan: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.time = nn.Linear(1, 4)
        self.label = nn.Embedding(CLASSES + 1, 4)
        self.batch_dependent, self.nan = batch_dependent, nan

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x) + (self.time(t[:, None].float()) + self.label(y))[:, :, None, None]
        if self.batch_dependent:
            h = h - h.mean(0, keepdim=True)  # rows mix: what BatchNorm in training mode does
        if self.nan:
            h = h + torch.log(h * 0 - 1)  # NaN everywhere
        return F.silu(self.down(h)), torch.tanh(h)


class Denoiser(nn.Module):
    """(x, t, tau, y, h_lo, h_hi) -> eps (B, C, H, W)."""

    def __init__(self, lo_channels: int = 6) -> None:
        super().__init__()
        self.lo_channels = lo_channels  # 6 takes the encoder's h_lo; another count plants a feature-shape defect
        self.mix = nn.Conv2d(C + lo_channels + 4, 8, 3, padding=1)
        self.out = nn.Conv2d(8, C, 3, padding=1)
        self.time = nn.Linear(2, 8)
        self.label = nn.Embedding(CLASSES + 1, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, y: torch.Tensor, h_lo: torch.Tensor,
                h_hi: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(h_lo, scale_factor=2.0, mode="nearest")
        h = self.mix(torch.cat([x, up, h_hi], 1)) + (self.time(torch.stack([t, tau], 1).float()) + self.label(y))[:, :, None, None]
        return self.out(F.silu(h))


def card(**override: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "format": "onnx",
        "sample": {"channels": C, "height": H, "width": W, "output_height": H, "output_width": W - 2},
        "classes": {"count": CLASSES, "null_label": CLASSES, "names": ["a", "b", "c", "d", "e"]},
        "diffusion": {"schedule": {"kind": "cosine", "logsnr_min": -12.0, "logsnr_max": 10.0},
                      "prediction": "eps", "time_input": "t"},
        "encoder": {"inputs": {"z": "x_in", "time": "t_in", "label": "y"}, "outputs": ["h_lo", "h_hi"]},
        "denoiser": {"inputs": {"z": "x_in", "time": "t_in", "encoder_time": "tau_in", "label": "y",
                                "features": ["h_lo", "h_hi"]}, "output": "eps_out"},
        "defaults": {"steps": 12, "encoder_interval": 3, "guidance_scale": 2.0},
    }
    c.update(override)
    return c


def write_model(folder: Path, fmt: str = "onnx", card_override: dict[str, Any] | None = None,
                encoder: nn.Module | None = None, denoiser: nn.Module | None = None,
                denoiser_names: list[str] | None = None, time_dtype: torch.dtype = torch.float32,
                tie_times: bool = False) -> Path:
    """A model folder: the pair (seeded), exported in `fmt`, and its card (with `card_override` merged on top)."""
    torch.manual_seed(0)
    enc, den = (encoder or Encoder()).eval(), (denoiser or Denoiser()).eval()
    folder.mkdir(parents=True, exist_ok=True)
    b = 2
    x, t, y = torch.randn(b, C, H, W), torch.rand(b).to(time_dtype), torch.tensor([1, CLASSES])
    # tau a tensor of its own: given t twice, torch.export ties the two inputs together (one placeholder for both)
    tau = t if tie_times else torch.rand(b).to(time_dtype)  # tie_times plants the defect
    with torch.no_grad():
        h_lo, h_hi = enc(x, t.float(), y)
    h_lo = h_lo[:, :1].repeat(1, getattr(den, "lo_channels", 6), 1, 1)  # what this denoiser was written for
    den_names = denoiser_names or ["x_in", "t_in", "tau_in", "y", "h_lo", "h_hi"]
    if fmt == "onnx":
        torch.onnx.export(enc, (x, t, y), str(folder / "encoder.onnx"), input_names=["x_in", "t_in", "y"],
                          output_names=["h_lo", "h_hi"], dynamic_axes={n: {0: "b"} for n in
                                                                        ("x_in", "t_in", "y", "h_lo", "h_hi")},
                          opset_version=17, dynamo=False)
        torch.onnx.export(den, (x, t, tau, y, h_lo, h_hi), str(folder / "denoiser.onnx"), input_names=den_names,
                          output_names=["eps_out"], dynamic_axes={n: {0: "b"} for n in [*den_names, "eps_out"]},
                          opset_version=17, dynamo=False)
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        ep = torch.export.export(enc, (x, t, y), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
        torch.export.save(ep, str(folder / "encoder.pt2"))
        ep = torch.export.export(den, (x, t, tau, y, h_lo, h_hi), dynamic_shapes=tuple({0: batch} for _ in range(6)))
        torch.export.save(ep, str(folder / "denoiser.pt2"))
    c = card(format=fmt)
    if fmt == "torch-export":  # a program's inputs are its forward's parameter names; outputs are named in order
        c["encoder"] = {"inputs": {"z": "x", "time": "t", "label": "y"}, "outputs": ["h_lo", "h_hi"]}
        c["denoiser"] = {"inputs": {"z": "x", "time": "t", "encoder_time": "tau", "label": "y",
                                    "features": ["h_lo", "h_hi"]}, "output": "eps"}
    for k, v in (card_override or {}).items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (folder / "model_card.json").write_text(json.dumps(c, indent=2))
    return folder
