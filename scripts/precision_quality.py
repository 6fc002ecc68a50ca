"""Quality of the compiled bf16 networks against fp32, with the project's evaluator (FID in the digit classifier's
feature space, class accuracy) on the same disjoint seed sets as `dualrate.eval`, at the card's defaults.

    python scripts/precision_quality.py [--num-images 800] [--seed-sets 3] [--out docs/precision.md]

Arms: the torch backend eager fp32 (the reference), compiled (torch.compile, Inductor) bf16 under autocast. Also
the max pixel difference (of 255) of the first 16 whole images of the first seed set against fp32.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.diffusion import CosineSchedule
from dualrate.eval import Evaluator, quantize, seed_set_starts
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from dualrate.sampler import dual_rate_sample
from engines import create_engine

ARMS = {"fp32 eager": {"precision": "fp32"}, "bf16 compiled (autocast)": {"precision": "bf16", "compile": True}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--num-images", type=int, default=800)
    p.add_argument("--seed-sets", type=int, default=3)
    p.add_argument("--batch", type=int, default=100, help="images per sampler call (one compiled bucket: 2 x this)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = load_checkpoint(a.checkpoint)
    d, cfg = model.defaults, model.cfg
    sched = CosineSchedule(cfg.logsnr_min, cfg.logsnr_max)
    ev = Evaluator()
    results: dict[str, dict] = {}
    first16: dict[str, torch.Tensor] = {}
    for arm, opts in ARMS.items():
        t0 = time.perf_counter()
        e = create_engine(a.checkpoint, backend="torch", device="cpu", max_batch=2 * a.batch, buckets=(2 * a.batch,),
                          **opts)
        e.warmup()
        warm = time.perf_counter() - t0
        fids, accs, secs = [], [], 0.0
        for start in tqdm(seed_set_starts(10_000, a.num_images, a.seed_sets), desc=arm):
            labels = torch.arange(a.num_images) % cfg.num_classes
            seeds = [start + j for j in range(a.num_images)]
            t1, out = time.perf_counter(), []
            for i in range(0, a.num_images, a.batch):
                x, _ = dual_rate_sample(e.encode, e.denoise, labels[i : i + a.batch], seeds[i : i + a.batch], d.steps,
                                        d.encoder_interval, d.guidance_scale, sched, cfg.null_label,
                                        sample_shape=cfg.sample_shape)
                out.append(x)
            secs += time.perf_counter() - t1
            imgs = torch.cat(out)
            fids.append(ev.fid(imgs))
            accs.append(ev.accuracy(imgs, labels))
            if arm not in first16:
                first16[arm] = quantize(imgs[:16])
        results[arm] = {"fids": fids, "fid_mean": float(np.mean(fids)), "fid_std": float(np.std(fids, ddof=1)),
                        "accuracy_mean": float(np.mean(accs)), "images_per_s": a.num_images * a.seed_sets / secs,
                        "warmup_s": warm}
        logging.info("%s: %s", arm, results[arm])
    ref = next(iter(ARMS))
    for arm in ARMS:
        diff = (first16[arm] - first16[ref]).abs() * 127.5  # quantized images in [-1, 1]: 1/127.5 per level
        results[arm]["first16_max_pixel_diff_vs_fp32"] = round(float(diff.max()))
    command = command_line("python scripts/precision_quality.py", argv)
    lines = [f"### bf16 compiled against fp32, {utc_stamp()}, {platform.machine()} CPU", "", f"Command: `{command}`", "",
             f"Shipped checkpoint at its defaults (N = {d.steps}, K = {d.encoder_interval}, guidance "
             f"{d.guidance_scale}); {a.seed_sets} disjoint seed sets of {a.num_images} (the evaluator's); FID in the "
             "project classifier's feature space.", "",
             "| arm | FID per seed set | FID mean ± std | accuracy | max pixel diff, 16 images vs fp32 | images/s (CPU) |",
             "|---|---|---:|---:|---:|---:|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {', '.join(f'{f:.2f}' for f in r['fids'])} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} "
                     f"| {r['accuracy_mean']:.3f} | {r['first16_max_pixel_diff_vs_fp32']} | {r['images_per_s']:.2f} |")
    publish(lines, a.out, {**provenance(a.checkpoint, command), "arms": results})


if __name__ == "__main__":
    main()
