"""Write a random-weight checkpoint folder in the shipped layout, for any preset.

    python -m dualrate.init --preset rgb64 --out checkpoints/rgb64-random [--seed 0]

The folder holds encoder.safetensors, denoiser.safetensors and model_card.json (config with the image geometry,
schedule, sampling defaults, FLOPs per forward), exactly as `python -m dualrate.train --checkpoint` writes them. Use it
to see the layout, to load weights trained elsewhere into it (same tensor names: `python -c "from dualrate.nets import
ContextEncoder; ..."`), or to benchmark serving at a realistic size. The images of random weights are noise.
The networks start with some layers at zero (each block starts as the identity); here those get small random values
too, so both networks and the encoder features matter to the output, as in a trained model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from dualrate.checkpoint import model_card, save_checkpoint
from dualrate.config import MODEL_PRESETS
from dualrate.nets import ContextEncoder, LightDenoiser, standalone_config

log = logging.getLogger("dualrate.init")


def init_checkpoint(preset: str, out: Path, seed: int = 0, standalone: str = "") -> Path:
    """standalone "large" / "small": the preset's standalone baseline (nets.standalone_config) instead of its pair."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(MODEL_PRESETS))}")
    cfg = standalone_config(MODEL_PRESETS[preset], standalone) if standalone else MODEL_PRESETS[preset]
    torch.manual_seed(seed)
    encoder, denoiser = ContextEncoder(cfg).eval(), LightDenoiser(cfg).eval()
    with torch.no_grad():
        for net in (encoder, denoiser):
            for p in net.parameters():
                if p.dim() > 1 and not p.any():  # zero-initialised weights: the blocks would be the identity
                    p.normal_(0.0, 0.02)
    card = model_card(cfg, Path(out).name,
                      data={"dataset": "none: random weights from `python -m dualrate.init`",
                            "image": f"{cfg.channels}x{cfg.image_size}x{cfg.image_size}, delivered as "
                                     f"{cfg.output_size}x{cfg.output_size}",
                            "labels": f"0-{cfg.num_classes - 1}, null label {cfg.null_label}"},
                      training={"preset": preset, "standalone": standalone, "seed": seed, "steps": 0})
    save_checkpoint(Path(out), encoder, denoiser, card)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dualrate.init", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(MODEL_PRESETS), help="model config (geometry, widths)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--standalone", choices=("large", "small"), default="",
                   help="the preset's standalone baseline (one U-ViT run every step, no encoder) instead of its pair")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = init_checkpoint(a.preset, a.out, a.seed, a.standalone)
    card = MODEL_PRESETS[a.preset]
    log.info("wrote a random %s checkpoint (%dx%dx%d) to %s", a.preset, card.channels, card.image_size,
             card.image_size, out)


if __name__ == "__main__":
    main()
