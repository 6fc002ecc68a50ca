"""The project's evaluator: FID in the digit classifier's feature space, class accuracy, sample grids, and a sweep.

    python -m dualrate.evaluate --num-images 800 --seed-sets 3 \
        --baselines checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small --out docs

The sweep reports, per (steps N, interval K, guidance), FID against the MNIST test set, class accuracy of the
conditional samples, counted model FLOPs per image and images/s measured on this machine, as a markdown table and
a plot of FID against FLOPs. Every row is run on `--seed-sets` disjoint seed sets (the same sets for every row) and
reported as mean and standard deviation over the sets. Two control rows: K = N (one encoder call per image) and the
light network with zeroed features (no encoder at all). `--baselines`: standalone checkpoints (`python -m
dualrate.train --standalone ...`), swept over steps 8-64 on the same seeds; the report then says how dual-rate compares
at matched FID and at matched FLOPs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import Tensor
from tqdm import tqdm

from dualrate.checkpoint import CARD_FILE, DEFAULT_CHECKPOINT, LoadedModel, checkpoint_hash, load_checkpoint, torch_fns, weights_hash
from dualrate.classifier import CLASSIFIER_DIR, DigitClassifier, batched, load_classifier
from dualrate.data import MNIST_SAMPLE, MNIST_SIZE, load_mnist, to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.nets import per_image_flops
from dualrate.provenance import command_line, provenance
from dualrate.sampler import dual_rate_sample, rows_per_image

log = logging.getLogger("dualrate.evaluate")


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    covmean = linalg.sqrtm(cov1 @ cov2)  # the same matrix as disp=False gave (checked), without its deprecation
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


class Evaluator:
    """FID against the MNIST test set and class accuracy, both through the project's digit classifier."""

    def __init__(self, classifier: DigitClassifier | None = None) -> None:
        self.net = classifier or load_classifier(CLASSIFIER_DIR)
        x, _ = load_mnist("test")
        self.ref_mu, self.ref_cov = feature_stats(batched(self.net.features, x))

    @torch.no_grad()
    def fid(self, images: Tensor) -> float:
        """MNIST-geometry samples (B, 1, S, S) in [-1, 1]; re-quantized to uint8 as the service would serve them."""
        mu, cov = feature_stats(batched(self.net.features, quantize(images)))
        return frechet_distance(mu, cov, self.ref_mu, self.ref_cov)

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return (batched(self.net, quantize(images)).argmax(1) == labels).float().mean().item()


def quantize(images: Tensor) -> Tensor:
    """Round-trip through the served uint8 28x28 image, padded back to 32x32."""
    return from_pictures(to_uint8(images, MNIST_SIZE))


def from_pictures(pictures: np.ndarray) -> Tensor:
    """Served MNIST pictures, uint8 (B, MNIST_SIZE, MNIST_SIZE) (decoded PNGs) -> the evaluator's input, padded to
    (B, 1, MNIST_SAMPLE, MNIST_SAMPLE) in [-1, 1]."""
    u8 = torch.from_numpy(np.asarray(pictures)).float() / 127.5 - 1.0
    pad = (MNIST_SAMPLE - MNIST_SIZE) // 2
    return torch.nn.functional.pad(u8[:, None], (pad, pad, pad, pad), value=-1.0)


def save_grid(images: Tensor, path: Path, nrow: int = 10, scale: int = 2) -> None:
    """Save MNIST-geometry samples as one PNG grid of their served (MNIST_SIZE) tiles."""
    tiles = to_uint8(images, MNIST_SIZE)  # (B, 28, 28)
    rows = math.ceil(len(tiles) / nrow)
    grid = np.zeros((rows * 30, nrow * 30), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = tile
    img = Image.fromarray(grid, mode="L")
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


@dataclass
class SweepRow:
    steps: int
    encoder_interval: int | None  # None = zeroed features (no encoder)
    guidance_scale: float
    fid: float  # mean over the seed sets
    accuracy: float
    encoder_calls: int
    gflops_per_image: float
    images_per_s: float
    note: str = ""
    model: str = "dual-rate"  # or the standalone checkpoint's name
    fid_std: float = 0.0  # standard deviation over the seed sets (ddof 1; 0 for one set)
    accuracy_std: float = 0.0
    fids: list[float] = field(default_factory=list)  # one per seed set


def generate(
    model: LoadedModel, n: int, steps: int, k: int | None, g: float, seed: int = 10_000, batch: int = 250,
    refresh_steps: list[int] | None = None, seeds: list[int] | None = None, labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, int]:
    """n conditional images, labels 0..9 in turn and seeds seed, seed + 1, ... (or the given `seeds` and `labels`,
    e.g. those of images a server returned). Returns images, labels, seconds, encoder calls per image."""
    encode, denoise = torch_fns(model)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(n) % model.cfg.num_classes if labels is None else labels
    all_seeds = [seed + j for j in range(n)] if seeds is None else seeds
    out, calls = [], 0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        lab = labels[i : i + batch]
        imgs, stats = dual_rate_sample(
            encode, denoise, lab, all_seeds[i : i + len(lab)], steps, k or steps, g, sched,
            model.cfg.null_label, sample_shape=model.cfg.sample_shape,
            feature_shapes=model.cfg.feature_shapes if k is None else None, refresh_steps=refresh_steps,
        )
        out.append(imgs)
        calls = 0 if k is None else stats.encoder_calls
    return torch.cat(out), labels, time.perf_counter() - t0, calls


def sweep_configs(default_steps: int, default_g: float) -> list[tuple[int, int | None, float, str]]:
    """Dual-rate rows: K = 1..N at the default steps N, the two controls, and steps N/2 and 2N at K = 4 (the Pareto
    plot's second curve; 16 and 64 at the shipped N = 32). Other guidance scales are left out (each costs as much as
    a row above on every seed set; the single-set sweep before 2026-11-27's baselines had 1, 2 and 3: FID 22.8, 33.3,
    74.1 at K = 4, git history)."""
    n = default_steps
    rows: list[tuple[int, int | None, float, str]] = [(n, k, default_g, "") for k in (1, 2, 4, 8, 16)]
    rows += [(n, n, default_g, "control: K = N, one encoder call"), (n, None, default_g, "control: zeroed features")]
    rows += [(n // 2, 4, default_g, ""), (2 * n, 4, default_g, "")]
    return rows


def baseline_configs(model: LoadedModel, default_steps: int, default_g: float) -> list[tuple[int, int | None, float, str]]:
    """A standalone model over steps N/4 .. 2N of the pair's default N (8-64 for N = 32) at the pair's guidance (its
    K changes nothing: the card's default)."""
    n = default_steps
    return [(steps, model.defaults.encoder_interval, default_g, "") for steps in (n // 4, n // 2, n, 2 * n)]


def seed_set_starts(first: int, n_images: int, sets: int) -> list[int]:
    """Disjoint seed sets of n_images each: first .. first + n - 1, then the next n, ..."""
    return [first + i * n_images for i in range(sets)]


def run_sweep(model: LoadedModel, ev: Evaluator, n_images: int, configs, seed: int = 10_000, seed_sets: int = 1,
              name: str = "dual-rate") -> list[SweepRow]:
    enc_f, den_f = per_image_flops(model.cfg)
    for net in (model.encoder, model.denoiser):  # ~20% faster convs on CPU; the same for every row
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    rows = []
    for steps, k, g, note in tqdm(configs, desc=f"sweep {name}"):
        fids, accs, secs, calls = [], [], 0.0, 0
        for start in seed_set_starts(seed, n_images, seed_sets):
            imgs, labels, dt, calls = generate(model, n_images, steps, k, g, seed=start)
            fids.append(ev.fid(imgs))
            accs.append(ev.accuracy(imgs, labels))
            secs += dt
        mult = rows_per_image(0, g, model.cfg.null_label)  # conditional samples: guided ones run two rows
        flops = mult * (calls * enc_f + steps * den_f)
        row = SweepRow(steps, k, g, float(np.mean(fids)), float(np.mean(accs)), calls, flops / 1e9,
                       n_images * seed_sets / secs, note, model=name,
                       fid_std=float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0,
                       accuracy_std=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, fids=fids)
        log.info("%s", row)
        rows.append(row)
    return rows


def markdown_table(rows: list[SweepRow]) -> str:
    lines = ["| model | steps N | K | guidance | FID (mean ± std) | accuracy | encoder calls | GFLOPs/image | images/s | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        standalone = r.model != "dual-rate"
        k = "-" if standalone else "none (zeroed)" if r.encoder_interval is None else str(r.encoder_interval)
        calls = "-" if standalone else str(r.encoder_calls)
        lines.append(f"| {r.model} | {r.steps} | {k} | {r.guidance_scale:g} | {r.fid:.2f} ± {r.fid_std:.2f} | "
                     f"{100 * r.accuracy:.1f}% | {calls} | {r.gflops_per_image:.2f} | {r.images_per_s:.1f} | {r.note} |")
    return "\n".join(lines)


def _curves(rows: list[SweepRow], default_steps: int, default_g: float) -> dict[str, tuple[bool, list[SweepRow]]]:
    """The plot's curves, each sorted by FLOPs and flagged True where it runs over steps: dual-rate over K at the
    default steps, dual-rate at K = 4 over steps, and each standalone model over steps (all at the default guidance)."""
    main = [r for r in rows if r.guidance_scale == default_g]
    n = default_steps
    curves = {
        f"dual-rate, N = {n}, K = 1..{n}": (False, [
            r for r in main if r.model == "dual-rate" and r.steps == n and r.encoder_interval is not None]),
        f"dual-rate, K = 4, N = {n // 2} / {n} / {2 * n}": (
            True, [r for r in main if r.model == "dual-rate" and r.encoder_interval == 4]),
    }
    for name in dict.fromkeys(r.model for r in main if r.model != "dual-rate"):
        curves[f"{name}, N = {n // 4}..{2 * n}"] = (True, [r for r in main if r.model == name])
    return {k: (steps, sorted(v, key=lambda r: r.gflops_per_image)) for k, (steps, v) in curves.items() if v}


def plot(rows: list[SweepRow], path: Path, default_steps: int = 32, default_g: float = 1.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["o-", "s--", "^-", "v-", "D-"]
    for (label, (over_steps, sel)), style in zip(_curves(rows, default_steps, default_g).items(), styles, strict=False):
        ax.errorbar([r.gflops_per_image for r in sel], [r.fid for r in sel], yerr=[r.fid_std for r in sel],
                    fmt=style, capsize=3, label=label, markersize=5)
        for r in sel:
            if over_steps and r.model == "dual-rate" and r.steps == default_steps:
                continue  # the K = 4 point is on the K curve, labelled there
            tag = f"N={r.steps}" if over_steps else f"K={r.encoder_interval}"
            ax.annotate(tag, (r.gflops_per_image, r.fid), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("model GFLOPs per image (counted; guided: cond + uncond)")
    ax.set_ylabel("FID (classifier features, vs MNIST test), mean ± std over seed sets")
    n_sets = max((len(r.fids) for r in rows), default=1)
    ax.set_title(f"MNIST: quality vs compute, dual-rate against standalone models ({n_sets} seed sets per point)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparisons(rows: list[SweepRow], default_steps: int, default_g: float) -> list[str]:
    """What the issue asks of the baselines, computed from the rows (so a rerun restates it from its own numbers):
    (1) per standalone-large row, the cheapest dual-rate row whose mean FID is within one standard deviation (the
    larger of the two rows' stds) of it or below, and the FLOPs ratio; (2) standalone-small at the default steps
    against the dual-rate row nearest to it in FLOPs: the FID difference against the spread."""
    main = [r for r in rows if r.guidance_scale == default_g and r.encoder_interval is not None]
    dual = [r for r in main if r.model == "dual-rate"]
    out: list[str] = []
    for r in (r for r in main if r.model.endswith("standalone-large")):
        ok = [d for d in dual if d.fid <= r.fid + max(r.fid_std, d.fid_std)]
        if not ok:
            out.append(f"- {r.model} N = {r.steps} (FID {r.fid:.2f} ± {r.fid_std:.2f}, {r.gflops_per_image:.2f} GFLOPs):"
                       " no dual-rate row reaches its FID within one std.")
            continue
        d = min(ok, key=lambda d: d.gflops_per_image)
        out.append(f"- {r.model} N = {r.steps} (FID {r.fid:.2f} ± {r.fid_std:.2f}, {r.gflops_per_image:.2f} GFLOPs): the "
                   f"cheapest dual-rate row within one std is N = {d.steps}, K = {d.encoder_interval} (FID {d.fid:.2f} ± "
                   f"{d.fid_std:.2f}, {d.gflops_per_image:.2f} GFLOPs): **{r.gflops_per_image / d.gflops_per_image:.2f}x** "
                   "fewer FLOPs per image.")
    for r in (r for r in main if r.model.endswith("standalone-small") and r.steps == default_steps):
        d = min(dual, key=lambda d: abs(math.log(d.gflops_per_image / r.gflops_per_image)))
        spread = max(r.fid_std, d.fid_std)
        verdict = "lower by more than the spread" if r.fid - d.fid > spread else "not lower by more than the spread"
        out.append(f"- {r.model} N = {r.steps} ({r.gflops_per_image:.2f} GFLOPs, FID {r.fid:.2f} ± {r.fid_std:.2f}) against "
                   f"dual-rate N = {d.steps}, K = {d.encoder_interval} ({d.gflops_per_image:.2f} GFLOPs, FID {d.fid:.2f} ± "
                   f"{d.fid_std:.2f}): dual-rate's FID is {r.fid - d.fid:+.2f} below it, {verdict} "
                   f"({spread:.2f}).")
    return out


@torch.no_grad()  # a decorator, not set_grad_enabled: callers in the same process keep autograd
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--num-images", type=int, default=400,
                   help="samples per sweep row and seed set (FID against the 10k test set)")
    p.add_argument("--seed-sets", type=int, default=3,
                   help="disjoint seed sets per row (mean and standard deviation over them; 1 = no spread)")
    p.add_argument("--baselines", type=Path, nargs="*", default=[],
                   help="standalone checkpoints to sweep over steps 8-64 on the same seeds (e.g. "
                   "checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small)")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate"),
                   help="where the tables, raw JSON and plots go (default runs/evaluate, untracked; `make evaluate` "
                   "passes --out docs to refresh the committed ones)")
    p.add_argument("--sweep", type=Path, default=Path("docs/sweep.json"),
                   help="the committed sweep that --check compares with and --card-from-sweep reads")
    p.add_argument("--update-card", action="store_true", help="write the sweep's figures into the model card")
    p.add_argument("--card-from-sweep", action="store_true",
                   help="write the dual-rate rows of --sweep (mean and spread over its seed sets) into the model card "
                   "without sampling again; refused unless --sweep was measured on this checkpoint's weights")
    p.add_argument("--update-baseline-cards", action="store_true",
                   help="write each baseline's rows into its own model card")
    p.add_argument("--check", action="store_true",
                   help="only K = 1, 4, 8 and zeroed features at the default steps, side by side with the committed "
                   "sweep (--sweep): writes OUT/check.md and OUT/check.json (e.g. after a change to the sampler's noise). "
                   "Took 363 s on 2 cores at --num-images 800 (2026-11-30; an estimate is logged at the start, from the "
                   "committed sweep's images/s, which runs faster than a check)")
    p.add_argument("--seed", type=int, default=10_000,
                   help="first seed: the seed sets are the next --num-images seeds each (sweep.json: 10000)")
    p.add_argument("--ks", default="1,4,8,zeroed", help="--check: the rows, K values or 'zeroed'")
    p.add_argument("--name", default="check", help="--check: output file name (<name>.md, <name>.json)")
    p.add_argument("--replot", action="store_true", help="only redraw OUT/fid_vs_flops.png from OUT/sweep.json")
    a = p.parse_args(argv)
    if a.replot:
        rows = [SweepRow(**r) for r in json.loads((a.out / "sweep.json").read_text())]
        d0 = load_checkpoint(a.checkpoint).defaults
        plot(rows, a.out / "fid_vs_flops.png", d0.steps, d0.guidance_scale)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.check:
        check(a, argv)
        return
    if a.card_from_sweep:
        card_from_sweep(a.checkpoint, a.sweep)
        return
    model = load_checkpoint(a.checkpoint)
    base_models = {path: load_checkpoint(path) for path in a.baselines}
    for path, base in base_models.items():
        if not base.cfg.standalone:
            p.error(f"--baselines {path}: not a standalone checkpoint (its card's config kind is {base.cfg.kind!r}); "
                    "train one with `python -m dualrate.train --standalone large|small`")
    ev = Evaluator()
    d = model.defaults
    a.out.mkdir(parents=True, exist_ok=True)
    grid, _, _, _ = generate(model, 100, d.steps, d.encoder_interval, d.guidance_scale, seed=0, batch=100)
    save_grid(grid, a.out / "samples_grid.png")
    rows = run_sweep(model, ev, a.num_images, sweep_configs(d.steps, d.guidance_scale), a.seed, a.seed_sets)
    baselines: dict[Path, list[SweepRow]] = {}
    for path, base in base_models.items():
        baselines[path] = run_sweep(base, ev, a.num_images, baseline_configs(base, d.steps, d.guidance_scale), a.seed,
                                    a.seed_sets, name=base.card.get("name", path.name))
        rows += baselines[path]
    table = markdown_table(rows)
    plot(rows, a.out / "fid_vs_flops.png", d.steps, d.guidance_scale)
    command = command_line("python -m dualrate.evaluate", argv)
    claims = comparisons(rows, d.steps, d.guidance_scale)
    header = (f"Measured {date.today().isoformat()} on {platform.machine()} ({torch.get_num_threads()} threads): "
              f"{a.seed_sets} disjoint seed sets of {a.num_images} conditional samples per row (labels 0-9 in turn; "
              f"seeds {a.seed} onward, the same sets for every row), FID against the 10k MNIST test set in the project "
              "classifier's 128-d feature space; FID and accuracy are the mean over the sets, ± their standard "
              f"deviation.\n\nCommand: `{command}`\n\n")
    raw = ("Raw output: [sweep.json](sweep.json) (every set's FID in `fids`); date, machine, commit and checkpoint "
           "hashes: [sweep.provenance.json](sweep.provenance.json).\n\n")
    cmp = ("\n\n## Against the standalone baselines (computed from the rows above)\n\n" + "\n".join(claims) + "\n"
           if claims else "\n")
    (a.out / "sweep.md").write_text("# Sweep: steps, encoder interval, guidance, baselines\n\n" + raw + header + table
                                    + cmp)
    (a.out / "sweep.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    quality = {"measured": date.today().isoformat(), "num_images_per_row": a.num_images, "seed_sets": a.seed_sets}
    updates = ([(a.checkpoint, rows[: len(rows) - sum(map(len, baselines.values()))])] if a.update_card else [])
    updates += list(baselines.items()) if a.update_baseline_cards else []
    for path, own in updates:
        card_path = path / CARD_FILE
        card = json.loads(card_path.read_text())
        card["quality"] = {**quality, "sweep": [asdict(r) for r in own]}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    # After the card updates: the hashes are those of the checkpoints as they are left (and committed).
    prov = provenance(a.checkpoint, command)
    prov.update(weights_sha256=weights_hash(a.checkpoint), num_images_per_row=a.num_images)
    prov["baselines"] = {str(path): checkpoint_hash(path) for path in baselines}
    (a.out / "sweep.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(table + cmp)


def check(a: argparse.Namespace, argv: list[str] | None) -> None:
    """The quality rows that matter most, against the committed sweep's same rows (same seeds, same evaluator)."""
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    ks = [None if k == "zeroed" else int(k) for k in a.ks.split(",")]
    configs = [(d.steps, k, d.guidance_scale, "" if k else "zeroed") for k in ks]
    before = {(r["steps"], r["encoder_interval"], r["guidance_scale"]): r
              for r in json.loads(a.sweep.read_text()) if r.get("model", "dual-rate") == "dual-rate"}
    known = [before[c[:3]]["images_per_s"] for c in configs if c[:3] in before]
    if known:
        secs = sum(a.num_images / ips for ips in known) * len(configs) / len(known)
        log.info("--check: %d rows of %d images, at least %.0f min (the committed sweep's images/s, %s; a check ran "
                 "~1.7x that on 2 cores); writing to %s",
                 len(configs), a.num_images, secs / 60, a.sweep, a.out)
    rows = run_sweep(model, Evaluator(), a.num_images, configs, seed=a.seed)
    # The same seeds as a set of the sweep (its first set starts at 10000, each set a.num_images long) are compared
    # with that set's own FID; other seeds with the mean over the sets.
    prov_path = a.sweep.with_name(a.sweep.stem + ".provenance.json")
    per_row = sweep_images_per_row(json.loads(prov_path.read_text())) if prov_path.is_file() else None
    offset = a.seed - 10_000
    same_set = per_row == a.num_images and offset >= 0 and offset % a.num_images == 0
    set_index = offset // a.num_images if same_set else None

    def reference(b: dict) -> float:
        fids = b.get("fids") or []
        return fids[set_index] if set_index is not None and set_index < len(fids) else b["fid"]

    ref_name = f"seed set {set_index + 1} of sweep.json" if set_index is not None else "sweep.json (mean over its sets)"
    lines = [f"| N | K | FID now | FID in {ref_name} | ratio | accuracy now | accuracy in sweep.json (mean) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = before.get((r.steps, r.encoder_interval, r.guidance_scale))
        k = "zeroed" if r.encoder_interval is None else str(r.encoder_interval)
        lines.append(f"| {r.steps} | {k} | {r.fid:.2f} | {reference(b):.2f} | {r.fid / reference(b):.3f} | "
                     f"{100 * r.accuracy:.1f}% | {100 * b['accuracy']:.1f}% |" if b else f"| {r.steps} | {k} | {r.fid:.2f} | | | |")
    command = command_line("python -m dualrate.evaluate", argv)
    prov = provenance(a.checkpoint, command)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps({**prov, "seed": a.seed, "rows": [asdict(r) for r in rows]},
                                                     indent=2) + "\n")
    table = "\n".join(lines)
    (a.out / f"{a.name}.md").write_text(
        "# Quality check against the committed sweep\n\n"
        f"Raw output: [{a.name}.json]({a.name}.json) (date {prov['date']}, commit {prov['git_commit'][:12]}, checkpoint "
        f"sha256 {prov['checkpoint_sha256'][:12]}). Command: `{command}`; {a.num_images} conditional samples per row, "
        f"first seed {a.seed} (sweep.json: 10000), the same evaluator as {a.sweep}.\n\n" + table + "\n")
    print(table)
    print(f"written: {a.out / (a.name + '.md')}, {a.out / (a.name + '.json')}")


def sweep_images_per_row(prov: dict) -> int | None:
    """Images per row and seed set of a sweep, from its provenance (recorded since 2026-11-30; else its command)."""
    m = re.search(r"--num-images (\d+)", prov.get("command", ""))
    return prov.get("num_images_per_row") or (int(m.group(1)) if m else None)


def card_from_sweep(checkpoint: Path, sweep: Path) -> None:
    """The model card's quality from a committed sweep (its dual-rate rows, mean and spread over the seed sets), when
    the sweep's provenance says it sampled these weights: refreshing the card needs no new hour of sampling."""
    prov_path = sweep.with_name(sweep.stem + ".provenance.json")
    prov = json.loads(prov_path.read_text())
    # Newer sweeps record the weights' hash; older ones the whole checkpoint's (weights + card), which still matches
    # while the card has not been rewritten since.
    same = (prov["weights_sha256"] == weights_hash(checkpoint) if "weights_sha256" in prov
            else prov.get("checkpoint_sha256") == checkpoint_hash(checkpoint))
    if not same:
        raise SystemExit(f"{sweep} was measured on other weights than {checkpoint}'s ({prov_path}): run the sweep "
                         "again (make evaluate) instead")
    per_row = sweep_images_per_row(prov)
    rows = [r for r in json.loads(sweep.read_text()) if r.get("model", "dual-rate") == "dual-rate"]
    card_path = checkpoint / CARD_FILE
    card = json.loads(card_path.read_text())
    card["quality"] = {"measured": prov["date"][:10], "num_images_per_row": per_row,
                       "seed_sets": len(rows[0].get("fids") or [0]), "source": f"{sweep} (commit {prov['git_commit'][:12]}, "
                       f"{prov['command']})", "sweep": rows}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{card_path}: {len(rows)} rows from {sweep} ({card['quality']['seed_sets']} seed sets, measured "
          f"{card['quality']['measured']})")


if __name__ == "__main__":
    main()
