"""Does changing K in the middle of a trajectory (at a refresh boundary) cost quality beyond the fixed-K rows?

    python scripts/k_switch.py [--seeds 10000,20000] [--out docs/k_switch.md]

FID and class accuracy (the project's evaluator, 800 images per seed set, disjoint seed sets) for fixed K = 4,
fixed K = 8, and the two switches at step 16 of 32 (K = 4 then 8; K = 8 then 4: both 6 encoder calls). If a switch
lands between the fixed rows it shares its calls with, changing K at a refresh boundary is free; if it is worse than
both, K should be chosen once per request. Raw output beside the report.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.eval import Evaluator, generate
from dualrate.provenance import command_line, provenance, publish, utc_stamp


def schedules(steps: int, switch: int) -> dict[str, list[int]]:
    def fixed(k: int) -> list[int]:
        return list(range(0, steps, k))

    return {"K = 4": fixed(4), "K = 8": fixed(8),
            f"K = 4, then 8 from step {switch}": [i for i in fixed(4) if i < switch] + list(range(switch, steps, 8)),
            f"K = 8, then 4 from step {switch}": [i for i in fixed(8) if i < switch] + list(range(switch, steps, 4))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--num-images", type=int, default=800)
    p.add_argument("--seeds", default="10000,20000")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_checkpoint(a.checkpoint)
    d, ev = model.defaults, Evaluator()
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for name, refresh in tqdm(schedules(d.steps, d.steps // 2).items(), desc="schedules"):
        per_seed = {}
        for seed in seeds:
            imgs, labels, _, _ = generate(model, a.num_images, d.steps, 1, d.guidance_scale, seed=seed,
                                          refresh_steps=refresh)
            per_seed[seed] = {"fid": ev.fid(imgs), "accuracy": ev.accuracy(imgs, labels)}
        fids = [r["fid"] for r in per_seed.values()]
        rows.append({"schedule": name, "refresh_steps": refresh, "encoder_calls": len(refresh), "per_seed": per_seed,
                     "fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                     "accuracy_mean": statistics.mean(r["accuracy"] for r in per_seed.values())})
    stamp = utc_stamp()
    command = command_line("python scripts/k_switch.py", argv)
    lines = [f"### Changing K within a trajectory, {stamp}", "", f"Command: `{command}`", "",
             f"{a.num_images} images per seed set, seed sets {', '.join(map(str, seeds))}; N = {d.steps}, guidance "
             f"{d.guidance_scale}; FID against the MNIST test set through the project's classifier.", "",
             "| schedule | encoder calls | FID (mean +- std over seed sets) | per seed set | accuracy |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        per = ", ".join(f"{v['fid']:.2f}" for v in r["per_seed"].values())
        lines.append(f"| {r['schedule']} | {r['encoder_calls']} | {r['fid_mean']:.2f} +- {r['fid_std']:.2f} | {per} | "
                     f"{r['accuracy_mean']:.4f} |")
    publish(lines, a.out, {**provenance(a.checkpoint, command), "rows": rows})


if __name__ == "__main__":
    main()
