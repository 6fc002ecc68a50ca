"""Quality against training steps: the evaluator on a run's snapshots (`python -m dualrate.train --snapshot-every S`)
and its final checkpoint, at one sampling setting, so a reader sees whether a comparison is made before the models
converge.

    python scripts/training_curve.py --out docs/fashion/training_curve.md \
        fashion-dualrate=runs/fashion-dualrate fashion-standalone-large=runs/fashion-standalone-large

Each NAME=RUN evaluates RUN/snapshots/step-* and the checkpoint its training options name (or RUN/checkpoint), at
the card's steps, K and guidance unless --steps / --k / --guidance say otherwise, on the sweep's first seed set(s).
Writes the report (appended), its raw JSON beside it (date, machine, commit, every checkpoint's hash) and a PNG.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from dualrate.checkpoint import checkpoint_hash, checkpoint_problem, load_checkpoint
from dualrate.data import DATASETS
from dualrate.eval import Evaluator, dataset_of, run_sweep
from dualrate.provenance import command_line, provenance, publish, utc_stamp


def checkpoints_of(run: Path, final: Path | None) -> list[tuple[int, Path]]:
    """(trained steps, checkpoint) for each snapshot of a run and its final checkpoint, in training order."""
    found = [p for p in sorted((run / "snapshots").glob("step-*")) if checkpoint_problem(p) is None]
    if final is not None and checkpoint_problem(final) is None:
        found.append(final)
    out = []
    for path in found:
        training = load_checkpoint(path).card.get("training", {})
        out.append((int(training.get("trained_steps", training.get("steps", 0))), path))
    return sorted(out)


def setting(point: dict) -> str:
    r = point["row"]
    k = "" if "standalone" in r["model"] else f", K = {r['encoder_interval']}"
    return f"N = {r['steps']}{k}, guidance {r['guidance_scale']:g}"


def with_earlier_curves(curves: dict[str, list[dict]], raw: Path) -> dict[str, list[dict]]:
    """This run's curves and, for every model it did not evaluate, that model's latest curve from the earlier runs in
    the raw JSON: one picture of every model measured into the same report, e.g. the pair and standalone-large
    evaluated by two commands hours apart."""
    earlier: dict[str, list[dict]] = {}
    if raw.is_file():
        for run in json.loads(raw.read_text()).get("runs", []):
            earlier.update(run.get("curves", {}))
    return {**{k: v for k, v in earlier.items() if k not in curves}, **curves}


def plot(curves: dict[str, list[dict]], path: Path, title: str, spaces: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        key, std = ("fid", "fid_std") if space == "cnn" else ("fid_gap", "fid_gap_std")
        for name, points in curves.items():
            ax.errorbar([p["trained_steps"] for p in points], [p["row"][key] for p in points],
                        yerr=[p["row"][std] for p in points], fmt="o-", capsize=3, label=f"{name} ({setting(points[-1])})")
        ax.set_xlabel("training steps (batch 64)")
        ax.set_ylabel(f"FID ({space} features)")
        ax.set_yscale("log")
        ax.set_title(f"{title}: FID against training steps ({space} features)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER[:FINAL_CHECKPOINT] (final default: the run's --checkpoint "
                   "is not recorded, so name it, e.g. fashion-dualrate=runs/fashion-dualrate:checkpoints/fashion-dualrate)")
    p.add_argument("--num-images", type=int, default=800, help="per seed set")
    p.add_argument("--seed-sets", type=int, default=1)
    p.add_argument("--seed", type=int, default=10_000, help="first seed (the sweep's: 10000)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the card's)")
    p.add_argument("--k", type=int, default=None, help="encoder interval for dual-rate models (default: the card's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the card's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file; raw JSON and PNG beside it")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    curves: dict[str, list[dict]] = {}
    hashes: dict[str, str] = {}
    ev: Evaluator | None = None
    for spec in a.runs:
        name, _, where = spec.partition("=")
        run, _, final = where.partition(":")
        points = checkpoints_of(Path(run), Path(final) if final else None)
        if not points:
            p.error(f"{spec}: no snapshots under {run}/snapshots and no final checkpoint")
        for trained, path in points:
            model = load_checkpoint(path)
            if ev is None or ev.dataset != dataset_of(model.card):
                ev = Evaluator(dataset=dataset_of(model.card))
            d = model.defaults
            k = d.encoder_interval if model.cfg.standalone else (a.k or d.encoder_interval)
            config = (a.steps or d.steps, k, a.guidance if a.guidance is not None else d.guidance_scale, "")
            (row,) = run_sweep(model, ev, a.num_images, [config], a.seed, a.seed_sets, name=name)
            curves.setdefault(name, []).append({"trained_steps": trained, "checkpoint": str(path), "row": asdict(row)})
            hashes[str(path)] = checkpoint_hash(path)
    assert ev is not None
    command = command_line("python scripts/training_curve.py", argv)
    title = DATASETS[ev.dataset].title
    lines = [f"### Quality against training steps, {utc_stamp()}", "", f"Command: `{command}`", "",
             f"{a.seed_sets} seed set(s) of {a.num_images} conditional samples from seed {a.seed}; FID against the "
             f"{title} test split in the `cnn` and `gap` classifiers' feature spaces.", "",
             "| model | training steps | steps N | K | guidance | FID (cnn) | FID (gap) | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, points in curves.items():
        for pt in points:
            r = pt["row"]
            gap = f"{r['fid_gap']:.2f}" if r["fid_gap"] is not None else "-"
            k = "-" if "standalone" in name else r["encoder_interval"]
            lines.append(f"| {name} | {pt['trained_steps']} | {r['steps']} | {k} | {r['guidance_scale']:g} | "
                         f"{r['fid']:.2f} | {gap} | {100 * r['accuracy']:.1f}% |")
    if a.out is not None:
        plot(with_earlier_curves(curves, a.out.with_suffix(".json")), a.out.with_suffix(".png"), title, ev.spaces)
        lines += ["", f"![FID against training steps]({a.out.with_suffix('.png').name})"]
    first = next(iter(hashes))
    publish(lines, a.out, {**provenance(Path(first), command), "checkpoints": hashes, "curves": curves})


if __name__ == "__main__":
    main()
