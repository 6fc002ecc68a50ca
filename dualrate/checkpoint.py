"""The shipped checkpoint: EMA weights of both networks (safetensors) and a model card (json)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dualrate.config import ModelConfig, SamplingDefaults
from dualrate.nets import ContextEncoder, LightDenoiser

ENCODER_FILE = "encoder.safetensors"
DENOISER_FILE = "denoiser.safetensors"
CARD_FILE = "model_card.json"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "mnist-dualrate"


@dataclass
class LoadedModel:
    cfg: ModelConfig
    encoder: ContextEncoder
    denoiser: LightDenoiser
    card: dict[str, Any]
    defaults: SamplingDefaults
    path: Path


def save_checkpoint(path: Path, encoder: ContextEncoder, denoiser: LightDenoiser, card: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in encoder.state_dict().items()}, str(path / ENCODER_FILE))
    save_file({k: v.detach().contiguous().float() for k, v in denoiser.state_dict().items()}, str(path / DENOISER_FILE))
    (path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    for name in (ENCODER_FILE, DENOISER_FILE, CARD_FILE):
        # The safetensors writer leaves its files owner-only (0600); a checkpoint is read by whoever serves it (the
        # container's own user, uid 10001), so it is written readable by all, like the card.
        (path / name).chmod(0o644)


def checkpoint_problem(path: Path | str) -> str | None:
    """Why `path` is not a checkpoint folder, in one line that says what to do (None: it is one). The one message
    for every entry point: the service's settings, `python -m export`, `make serve`."""
    path = Path(path)
    missing = [n for n in (CARD_FILE, ENCODER_FILE, DENOISER_FILE) if not (path / n).is_file()]
    if not missing:
        try:
            ModelConfig.from_dict(json.loads((path / CARD_FILE).read_text())["config"])
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            return f"checkpoint {path}: {CARD_FILE}: {e if not isinstance(e, KeyError) else f'no {e} field'}"
        return None
    what = "does not exist" if not path.exists() else f"has no {', '.join(missing)}"
    return (f"checkpoint {path} {what}: set DUALRATE_CHECKPOINT (or make's CHECKPOINT) to a checkpoint folder, e.g. "
            f"checkpoints/mnist-dualrate, or write one with python -m dualrate.init")


def model_card(cfg: ModelConfig, name: str, data: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The card every checkpoint carries: config (geometry included), schedule, sampling defaults, FLOPs."""
    from dualrate.nets import per_image_flops

    enc_flops, den_flops = per_image_flops(cfg)
    method = ("Standalone diffusion U-ViT, run every step (a baseline for Dual-Rate Diffusion; its encoder does "
              "nothing)" if cfg.standalone else "Dual-Rate Diffusion (arXiv 2605.18190)")
    return {
        "name": name,
        "kind": cfg.kind,
        "method": method,
        "config": cfg.to_dict(),
        "schedule": {"kind": "cosine-logsnr", "logsnr_min": cfg.logsnr_min, "logsnr_max": cfg.logsnr_max,
                     "prediction": "v", "process": "variance-preserving", "sampler": "ancestral"},
        # A standalone model runs its one network every step; its null encoder costs a zero fill at any K.
        "defaults": SamplingDefaults(encoder_interval=1 if cfg.standalone else SamplingDefaults.encoder_interval).__dict__,
        "data": data,
        "training": training,
        "flops_per_forward": {"encoder": enc_flops, "denoiser": den_flops,
                              "ratio": den_flops / enc_flops if enc_flops else None},
        "quality": {},
    }


def checkpoint_hash(path: Path) -> str:
    """sha256 over the weights and the card: keys the ONNX and engine caches."""
    h = hashlib.sha256()
    for name in (ENCODER_FILE, DENOISER_FILE, CARD_FILE):
        h.update((path / name).read_bytes())
    return h.hexdigest()


def weights_hash(path: Path) -> str:
    """sha256 over the weights alone: what a measurement of the model depends on (the card may change after it)."""
    h = hashlib.sha256()
    for name in (ENCODER_FILE, DENOISER_FILE):
        h.update((path / name).read_bytes())
    return h.hexdigest()


def class_names(card: dict[str, Any]) -> list[str] | None:
    """The names of the model's classes (index = label), where its card has them (`data.class_names`)."""
    names = (card.get("data") or {}).get("class_names")
    return [str(n) for n in names] if isinstance(names, list) and names else None


def distilled_schedule(card: dict[str, Any]) -> tuple[int, int] | None:
    """(steps, encoder interval) a distilled student was trained for (`distilled` in its card; dualrate.distill), or
    None for a model that samples at any steps and K."""
    d = card.get("distilled")
    return (int(d["steps"]), int(d["encoder_interval"])) if isinstance(d, dict) and "steps" in d else None


def distilled_teacher(student: Path, card: dict[str, Any]) -> Path | None:
    """The teacher of a distilled student: the folder its card names, beside the student's (None: not distilled)."""
    d = card.get("distilled")
    return Path(student).parent / d["teacher"] if isinstance(d, dict) and "teacher" in d else None


def read_card(path: Path) -> dict[str, Any]:
    card_path = Path(path) / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"no model card at {card_path}: is {path} a checkpoint folder?")
    return json.loads(card_path.read_text())


def load_checkpoint(path: Path | str = DEFAULT_CHECKPOINT) -> LoadedModel:
    path = Path(path)
    card = read_card(path)
    cfg = ModelConfig.from_dict(card["config"])
    encoder, denoiser = ContextEncoder(cfg), LightDenoiser(cfg)
    encoder.load_state_dict(load_file(str(path / ENCODER_FILE)))
    denoiser.load_state_dict(load_file(str(path / DENOISER_FILE)))
    return LoadedModel(cfg, encoder.eval(), denoiser.eval(), card, card_defaults(card), path)


def card_defaults(card: dict[str, Any]) -> SamplingDefaults:
    """The sampling defaults a model card publishes (the dataclass's where it names none)."""
    d = card.get("defaults", {})
    return SamplingDefaults(**{k: d[k] for k in ("steps", "encoder_interval", "guidance_scale") if k in d})


def torch_fns(model: LoadedModel):
    """Eager PyTorch `encode` / `denoise` callables for the reference sampler."""

    def encode(z: torch.Tensor, tau: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(model.encoder(z, tau, label))

    def denoise(z: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, label: torch.Tensor, feats: tuple) -> torch.Tensor:
        return model.denoiser(z, t, tau, label, *feats)

    return encode, denoise
