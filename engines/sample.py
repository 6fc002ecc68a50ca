"""Sample images from a checkpoint with any engine and write one PNG per image (grayscale or RGB, the card's output size).

    python -m engines.sample --class-label 3 --num-images 8 --encoder-interval 4 --seed 0 --out samples/

Flags left out take the model card's defaults. Image i uses seed X + i. Omit --class-label for unconditional samples.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, torch_fns
from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import sample_in_batches

log = logging.getLogger("engines.sample")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint folder (default: shipped)")
    p.add_argument("--class-label", type=int, default=None, metavar="N",
                   help="class to draw, 0 to num_classes - 1 (MNIST: the digit); omit for unconditional samples")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="denoising steps N (default: model card)")
    p.add_argument("--encoder-interval", type=int, default=None,
                   help="K: run the heavy encoder every K-th step; 1 = every step (default: model card)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: model card)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--backend", default="torch", choices=["auto", "onnxruntime", "torch", "tensorrt"],
                   help="runtime for the two networks (engines other than torch need `python -m export` first)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per network call (work is cut into batches of this size; a guided image takes two "
                   "rows, so engines are built for 2x this many rows)")
    p.add_argument("--out", type=Path, required=True, help="output folder for PNGs")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.num_images < 1 or a.batch_size < 1:
        raise SystemExit("--num-images and --batch-size must be >= 1")
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    steps = a.steps or d.steps
    k = a.encoder_interval or d.encoder_interval
    g = d.guidance_scale if a.guidance_scale is None else a.guidance_scale
    if steps < 1 or k < 1 or g < 0:
        raise SystemExit("--steps and --encoder-interval must be >= 1, --guidance-scale >= 0")
    if a.backend == "torch":
        encode, denoise = torch_fns(model)
        max_rows = 2 * a.batch_size
    else:
        from engines import create_engine  # the other backends are loaded only when asked for

        engine = create_engine(a.checkpoint, backend=a.backend, max_batch=2 * a.batch_size)
        encode, denoise = engine.encode, engine.denoise
        max_rows = engine.max_batch
    if a.class_label is not None and not 0 <= a.class_label < model.cfg.num_classes:
        raise SystemExit(f"--class-label must be 0-{model.cfg.num_classes - 1} for this model, or left out")
    label = model.cfg.null_label if a.class_label is None else a.class_label
    labels = torch.full((a.num_images,), label, dtype=torch.long)
    seeds = [a.seed + i for i in range(a.num_images)]
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    images, stats = sample_in_batches(encode, denoise, labels, seeds, steps, k, g, sched, model.cfg.null_label,
                                      max_rows, sample_shape=model.cfg.sample_shape)
    a.out.mkdir(parents=True, exist_ok=True)
    for seed, img in zip(seeds, to_uint8(images, model.cfg.output_size), strict=True):
        name = f"{'uncond' if a.class_label is None else a.class_label}_seed{seed}.png"
        Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB").save(a.out / name)
    log.info("wrote %d images to %s (steps=%d, K=%d, guidance=%.2f, encoder calls/image=%d)",
             a.num_images, a.out, steps, k, g, stats.encoder_calls)


if __name__ == "__main__":
    main()
