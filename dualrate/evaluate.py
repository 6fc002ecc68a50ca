"""The project's evaluator: FID in two classifiers' feature spaces, class accuracy, sample grids, and a sweep.

    python -m dualrate.evaluate --num-images 800 --seed-sets 3 \
        --baselines checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small --out docs

The sweep reports, per (steps N, interval K, guidance), FID against the test split of the data set the checkpoint was
trained on (its card says which: MNIST or Fashion-MNIST) in the feature spaces of that data set's two classifiers
(`cnn`, the project's, and `gap`, another architecture: `python -m dualrate.classifier`), class accuracy of the
conditional samples, counted model FLOPs per image and images/s measured on this machine, as a markdown table and
a plot of FID against FLOPs. Every row is run on `--seed-sets` disjoint seed sets (the same sets for every row) and
reported as mean and standard deviation over the sets. Two control rows: K = N (one encoder call per image) and the
light network with zeroed features (no encoder at all). `--baselines`: standalone checkpoints (`python -m
dualrate.train --standalone ...`), swept over steps 8-64 on the same seeds; the report then says how dual-rate compares
at matched FID and at matched FLOPs. `--guidance 1.0,1.25,1.5,2.0 --sweep-steps 8,16,32,64 --sweep-ks 1,2,4,8` sweeps
every guidance instead (the pair over K at its steps and over steps at its K, the baselines over steps) and reports
every model at its best guidance per point, in both feature spaces (OUT/pareto.png).
Finished rows are kept in OUT/rows.jsonl: the same command, rerun after a stop, measures only the rows still missing.
`--kept-only` measures nothing: it reports the rows finished so far and lists the grid's rows still missing.
"""

from __future__ import annotations

import argparse
import hashlib
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
from dualrate.classifier import ARCHS, Classifier, batched, classifier_dir, load_classifier
from dualrate.data import DATASETS, MNIST_SAMPLE, MNIST_SIZE, load_dataset, to_uint8
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


def dataset_of(card: dict) -> str:
    """The registered data set a model was trained on, from its card (cards written before the registry: mnist)."""
    return (card.get("data") or {}).get("name") or "mnist"


_REFERENCE_STATS: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}


def reference_stats(dataset: str, arch: str, net: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the test split's features in one shipped classifier's space, computed once per process
    for those classifier weights (~7 s each on 2 cores): every later Evaluator of the same data set reuses them. The
    key holds the weights' sha256, so a retrained classifier is measured afresh."""
    weights = classifier_dir(dataset, arch) / "classifier.safetensors"
    key = (dataset, arch, hashlib.sha256(weights.read_bytes()).hexdigest())
    if key not in _REFERENCE_STATS:
        x, _ = load_dataset(dataset, "test")
        mu, cov = feature_stats(batched(net.features, x))
        mu.flags.writeable = cov.flags.writeable = False  # shared by every Evaluator that follows
        _REFERENCE_STATS[key] = mu, cov
    return _REFERENCE_STATS[key]


class Evaluator:
    """FID against a data set's test split and class accuracy, through that data set's classifiers: FID in each
    feature space found (`cnn`, the project's classifier, always; `gap`, the second architecture, where trained),
    accuracy by the `cnn` classifier."""

    def __init__(self, classifier: Classifier | None = None, dataset: str = "mnist",
                 spaces: tuple[str, ...] = ARCHS) -> None:
        self.dataset = dataset
        self.net = classifier or load_classifier(classifier_dir(dataset, "cnn"))
        nets: dict[str, Classifier] = {"cnn": self.net}
        for arch in spaces:
            if arch != "cnn" and classifier is None:
                path = classifier_dir(dataset, arch)
                if (path / "classifier.safetensors").is_file():
                    nets[arch] = load_classifier(path)
                else:
                    log.warning("no %s classifier for %s at %s: FID in one feature space only (train it with `python -m "
                                "dualrate.classifier --dataset %s --arch %s`)", arch, dataset, path, dataset, arch)
        if classifier is None:
            self.refs = {arch: (net, *reference_stats(dataset, arch, net)) for arch, net in nets.items()}
        else:  # a classifier handed in: its own statistics, never cached
            x, _ = load_dataset(dataset, "test")
            self.refs = {arch: (net, *feature_stats(batched(net.features, x))) for arch, net in nets.items()}
        self.ref_mu, self.ref_cov = self.refs["cnn"][1:]

    @property
    def spaces(self) -> list[str]:
        return list(self.refs)

    @torch.no_grad()
    def fid(self, images: Tensor) -> float:
        """Samples (B, 1, S, S) in [-1, 1] of the data set's geometry; re-quantized to uint8 as the service would serve
        them. FID in the `cnn` feature space."""
        return self.fids(images, ("cnn",))["cnn"]

    @torch.no_grad()
    def fids(self, images: Tensor, spaces: tuple[str, ...] | None = None) -> dict[str, float]:
        """FID in each feature space (or those named)."""
        x = quantize(images)
        out = {}
        for arch, (net, ref_mu, ref_cov) in self.refs.items():
            if spaces is None or arch in spaces:
                mu, cov = feature_stats(batched(net.features, x))
                out[arch] = frechet_distance(mu, cov, ref_mu, ref_cov)
        return out

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
    # The second feature space (the `gap` classifier's), where the evaluator has it: mean, std, one per seed set.
    fid_gap: float | None = None
    fid_gap_std: float = 0.0
    fids_gap: list[float] = field(default_factory=list)

    def in_space(self, space: str) -> tuple[float, float]:
        """(mean FID, its std over the seed sets) in a feature space: `cnn` (the project's classifier) or `gap`."""
        if space == "cnn":
            return self.fid, self.fid_std
        if self.fid_gap is None:
            raise ValueError(f"row {self.model} N = {self.steps} K = {self.encoder_interval} has no {space} FID")
        return self.fid_gap, self.fid_gap_std


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


def sweep_configs(default_steps: int, default_g: float, guidance: list[float] | None = None,
                  steps: list[int] | None = None, ks: list[int] | None = None,
                  default_k: int = 4) -> list[tuple[int, int | None, float, str]]:
    """Dual-rate rows. By default (the committed MNIST sweep): K = 1..N at the default steps N, the two controls, and
    steps N/2 and 2N at K = 4 (the Pareto plot's second curve; 16 and 64 at the shipped N = 32), all at the card's
    guidance. Given `guidance`, `steps` or `ks`, at each guidance: every K of `ks` at the default steps, every steps
    of `steps` at the default K (K above N left out), and the zeroed-features control at the default steps (missing
    lists: the card's value)."""
    n = default_steps
    if guidance is None and steps is None and ks is None:
        rows: list[tuple[int, int | None, float, str]] = [(n, k, default_g, "") for k in (1, 2, 4, 8, 16)]
        rows += [(n, n, default_g, "control: K = N, one encoder call"), (n, None, default_g, "control: zeroed features")]
        return [*rows, (n // 2, 4, default_g, ""), (2 * n, 4, default_g, "")]
    rows = []
    for g in guidance or [default_g]:
        points = dict.fromkeys([(n, k) for k in ks or [default_k]] + [(st, default_k) for st in steps or [n]])
        rows += [(st, k, g, "") for st, k in points if k <= st] + [(n, None, g, "control: zeroed features")]
    return rows


def baseline_configs(model: LoadedModel, default_steps: int, default_g: float, guidance: list[float] | None = None,
                     steps: list[int] | None = None) -> list[tuple[int, int | None, float, str]]:
    """A standalone model over steps N/4 .. 2N of the pair's default N (8-64 for N = 32), or the given steps, at each
    guidance (default: the pair's); its K changes nothing (the card's default)."""
    n = default_steps
    return [(st, model.defaults.encoder_interval, g, "") for g in guidance or [default_g]
            for st in steps or (n // 4, n // 2, n, 2 * n)]


def best_guidance(rows: list[SweepRow], space: str = "cnn") -> list[SweepRow]:
    """Each model at its best: per (model, steps, K), the row of the lowest mean FID in that feature space over the
    guidance scales swept (the zeroed control kept apart, as its own K)."""
    best: dict[tuple[str, int, int | None], SweepRow] = {}
    for r in rows:
        key = (r.model, r.steps, r.encoder_interval)
        if key not in best or r.in_space(space)[0] < best[key].in_space(space)[0]:
            best[key] = r
    return list(best.values())


def seed_set_starts(first: int, n_images: int, sets: int) -> list[int]:
    """Disjoint seed sets of n_images each: first .. first + n - 1, then the next n, ..."""
    return [first + i * n_images for i in range(sets)]


def run_sweep(model: LoadedModel, ev: Evaluator, n_images: int, configs, seed: int = 10_000, seed_sets: int = 1,
              name: str = "dual-rate", store: RowStore | None = None,
              missing: list[tuple[str, int, int | None, float]] | None = None) -> list[SweepRow]:
    """The rows of `configs`, each over the seed sets; rows already in `store` are taken from it. Given `missing` (a
    list), a row not in the store is not measured but appended to it as (model, steps, K, guidance)."""
    enc_f, den_f = per_image_flops(model.cfg)
    for net in (model.encoder, model.denoiser):  # ~20% faster convs on CPU; the same for every row
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    rows = []
    for steps, k, g, note in tqdm(configs, desc=f"sweep {name}"):
        key = RowStore.key(model, steps, k, g) if store is not None else ""
        if store is not None and (kept := store.get(key)) is not None:
            log.info("kept from %s: %s", store.path, kept)
            rows.append(kept)
            continue
        if missing is not None:
            missing.append((name, steps, k, g))
            continue
        per_space: dict[str, list[float]] = {space: [] for space in ev.spaces}
        accs, secs, calls = [], 0.0, 0
        for start in seed_set_starts(seed, n_images, seed_sets):
            imgs, labels, dt, calls = generate(model, n_images, steps, k, g, seed=start)
            for space, value in ev.fids(imgs).items():
                per_space[space].append(value)
            accs.append(ev.accuracy(imgs, labels))
            secs += dt
        fids, gap = per_space["cnn"], per_space.get("gap", [])
        mult = rows_per_image(0, g, model.cfg.null_label)  # conditional samples: guided ones run two rows
        flops = mult * (calls * enc_f + steps * den_f)
        row = SweepRow(steps, k, g, float(np.mean(fids)), float(np.mean(accs)), calls, flops / 1e9,
                       n_images * seed_sets / secs, note, model=name,
                       fid_std=float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0,
                       accuracy_std=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, fids=fids,
                       fid_gap=float(np.mean(gap)) if gap else None,
                       fid_gap_std=float(np.std(gap, ddof=1)) if len(gap) > 1 else 0.0, fids_gap=gap)
        log.info("%s", row)
        rows.append(row)
        if store is not None:
            store.put(key, row)
    return rows


def markdown_table(rows: list[SweepRow]) -> str:
    gap = any(r.fid_gap is not None for r in rows)
    lines = ["| model | steps N | K | guidance | FID (mean ± std) |" + (" FID, gap features |" if gap else "")
             + " accuracy | encoder calls | GFLOPs/image | images/s | note |",
             "|---|---:|---:|---:|---:|" + ("---:|" if gap else "") + "---:|---:|---:|---:|---|"]
    for r in rows:
        standalone = not r.model.startswith("dual-rate")
        k = "-" if standalone else "none (zeroed)" if r.encoder_interval is None else str(r.encoder_interval)
        calls = "-" if standalone else str(r.encoder_calls)
        second = (f" {r.fid_gap:.2f} ± {r.fid_gap_std:.2f} |" if r.fid_gap is not None else " |") if gap else ""
        lines.append(f"| {r.model} | {r.steps} | {k} | {r.guidance_scale:g} | {r.fid:.2f} ± {r.fid_std:.2f} |{second} "
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


def plot(rows: list[SweepRow], path: Path, default_steps: int = 32, default_g: float = 1.5, title: str = "MNIST") -> None:
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
    ax.set_ylabel(f"FID (classifier features, vs {title} test), mean ± std over seed sets")
    n_sets = max((len(r.fids) for r in rows), default=1)
    ax.set_title(f"{title}: quality vs compute, dual-rate against standalone models ({n_sets} seed sets per point)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # a grid sweep may have no row at the card's guidance
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparisons(rows: list[SweepRow], default_steps: int, default_g: float | None, space: str = "cnn") -> list[str]:
    """What the issue asks of the baselines, computed from the rows (so a rerun restates it from its own numbers), in
    one feature space: (1) per standalone-large row, the cheapest dual-rate row whose mean FID is within one standard
    deviation (the larger of the two rows' stds) of it or below, and the FLOPs ratio; (2) standalone-small at the
    default steps against the dual-rate row nearest to it in FLOPs: the FID difference against the spread. Rows at
    `default_g` only; None: the rows as given (e.g. each model at its best guidance, `best_guidance`)."""
    main = [r for r in rows if (default_g is None or r.guidance_scale == default_g) and r.encoder_interval is not None]
    dual = [r for r in main if r.model == "dual-rate"]

    def fid(r: SweepRow) -> str:
        mean, std = r.in_space(space)
        return f"FID {mean:.2f} ± {std:.2f}" + ("" if default_g is not None else f" at guidance {r.guidance_scale:g}")

    out: list[str] = []
    for r in (r for r in main if r.model.endswith("standalone-large")):
        ok = [d for d in dual if d.in_space(space)[0] <= r.in_space(space)[0] + max(r.in_space(space)[1], d.in_space(space)[1])]
        if not ok:
            out.append(f"- {r.model} N = {r.steps} ({fid(r)}, {r.gflops_per_image:.2f} GFLOPs):"
                       " no dual-rate row reaches its FID within one std.")
            continue
        d = min(ok, key=lambda d: d.gflops_per_image)
        ratio = r.gflops_per_image / d.gflops_per_image
        saving = f"**{ratio:.2f}x** fewer" if ratio >= 1 else f"**{1 / ratio:.2f}x more** (no saving)"
        out.append(f"- {r.model} N = {r.steps} ({fid(r)}, {r.gflops_per_image:.2f} GFLOPs): the "
                   f"cheapest dual-rate row within one std is N = {d.steps}, K = {d.encoder_interval} ({fid(d)}, "
                   f"{d.gflops_per_image:.2f} GFLOPs): {saving} FLOPs per image.")
    for r in (r for r in main if r.model.endswith("standalone-small") and r.steps == default_steps):
        if not dual:
            break
        d = min(dual, key=lambda d: abs(math.log(d.gflops_per_image / r.gflops_per_image)))
        (rf, rs), (df, ds) = r.in_space(space), d.in_space(space)
        spread = max(rs, ds)
        verdict = "lower by more than the spread" if rf - df > spread else "not lower by more than the spread"
        out.append(f"- {r.model} N = {r.steps} ({r.gflops_per_image:.2f} GFLOPs, {fid(r)}) against "
                   f"dual-rate N = {d.steps}, K = {d.encoder_interval} ({d.gflops_per_image:.2f} GFLOPs, {fid(d)}): "
                   f"dual-rate's FID is {rf - df:+.2f} below it, {verdict} ({spread:.2f}).")
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
    p.add_argument("--guidance", type=floats, default=None, metavar="G,G,...",
                   help="sweep these guidance scales for every model (e.g. 1.0,1.25,1.5,2.0) and report each model at "
                   "its best guidance per point (tables in both feature spaces, OUT/pareto.png); default: the card's")
    p.add_argument("--sweep-steps", type=ints, default=None, metavar="N,N,...",
                   help="steps to sweep (e.g. 8,16,32,64): the pair at its card's K, the baselines (default: the card's "
                   "for the pair, N/4..2N for the baselines)")
    p.add_argument("--sweep-ks", type=ints, default=None, metavar="K,K,...",
                   help="the pair's encoder intervals to sweep at its card's steps (e.g. 1,2,4,8; default: the card's K)")
    p.add_argument("--steps-k", type=int, default=None, metavar="K",
                   help="the pair's encoder interval for the --sweep-steps rows (default: the card's K)")
    p.add_argument("--kept-only", action="store_true",
                   help="measure nothing: report the grid from the rows already in OUT/rows.jsonl and list those still "
                   "missing (a long sweep's interim report; the samples grid is left as it is)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
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
    dataset = dataset_of(model.card)
    for path, base in base_models.items():
        if dataset_of(base.card) != dataset:
            p.error(f"--baselines {path} was trained on {dataset_of(base.card)}, the pair on {dataset}")
    ev = Evaluator(dataset=dataset)
    d = model.defaults
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.kept_only:
        grid, _, _, _ = generate(model, 100, d.steps, d.encoder_interval, d.guidance_scale, seed=0, batch=100)
        save_grid(grid, a.out / "samples_grid.png")
    done = RowStore(a.out / "rows.jsonl", a.num_images, a.seed, a.seed_sets, ev.spaces)
    missing: list[tuple[str, int, int | None, float]] | None = [] if a.kept_only else None
    rows = run_sweep(model, ev, a.num_images, sweep_configs(d.steps, d.guidance_scale, a.guidance, a.sweep_steps,
                                                            a.sweep_ks, a.steps_k or d.encoder_interval),
                     a.seed, a.seed_sets, store=done, missing=missing)
    baselines: dict[Path, list[SweepRow]] = {}
    for path, base in base_models.items():
        baselines[path] = run_sweep(base, ev, a.num_images, baseline_configs(base, d.steps, d.guidance_scale, a.guidance,
                                                                             a.sweep_steps),
                                    a.seed, a.seed_sets, name=base.card.get("name", path.name), store=done,
                                    missing=missing)
        rows += baselines[path]
    if a.kept_only and not rows:
        p.error(f"--kept-only: {a.out / 'rows.jsonl'} holds none of this grid's rows at these settings; run the sweep "
                "without --kept-only first")
    table = markdown_table(rows)
    plot(rows, a.out / "fid_vs_flops.png", d.steps, d.guidance_scale, title=DATASETS[dataset].title)
    command = command_line("python -m dualrate.evaluate", argv)
    claims = comparisons(rows, d.steps, d.guidance_scale)
    names = DATASETS[dataset].class_names
    when = (f"Reported {date.today().isoformat()} from {a.out / 'rows.jsonl'} (--kept-only: every row was measured by an "
            "earlier run of this sweep, its images/s on that run's threads)" if a.kept_only else
            f"Measured {date.today().isoformat()} on {platform.machine()} ({torch.get_num_threads()} threads)")
    header = (f"{when}: "
              f"{a.seed_sets} disjoint seed sets of {a.num_images} conditional samples per row (labels 0-"
              f"{len(names) - 1} in turn; seeds {a.seed} onward, the same sets for every row), FID against the "
              f"{DATASETS[dataset].title} test split in the 128-d feature space of the project's classifier (`cnn`)"
              + (" and of the second classifier (`gap`, another architecture)" if "gap" in ev.spaces else "")
              + "; FID and accuracy (by the `cnn` classifier) are the mean over the sets, ± their standard "
              f"deviation.\n\nCommand: `{command}`\n\n")
    raw = ("Raw output: [sweep.json](sweep.json) (every set's FID in `fids`); date, machine, commit and checkpoint "
           "hashes: [sweep.provenance.json](sweep.provenance.json).\n\n")
    cmp = ("\n\n## Against the standalone baselines (computed from the rows above)\n\n" + "\n".join(claims) + "\n"
           if claims else "\n")
    if a.guidance and len(a.guidance) > 1:
        cmp += best_guidance_report(rows, d.steps, ev.spaces)
        pareto_plot(rows, a.out / "pareto.png", ev.spaces, DATASETS[dataset].title)
    if missing:
        cmp += (f"\n## Not measured yet ({len(missing)} of the grid's {len(missing) + len(rows)} rows)\n\n"
                "This report was made with `--kept-only` from the rows finished so far; the same command without it "
                "measures these (model, steps N, K, guidance) and keeps the rest:\n\n"
                + "\n".join(f"- {m}, N = {st}" + (f", K = {'zeroed' if k is None else k}" if m.startswith("dual-rate") else "")
                             + f", guidance {g:g}" for m, st, k, g in missing) + "\n")
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


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


class RowStore:
    """Finished sweep rows, one JSON line each (OUT/rows.jsonl), keyed by the model's weights and the row's settings:
    a sweep stopped midway (hours on two cores) reruns only the rows it had not finished. Rows measured with other
    images per set, seeds, seed sets or feature spaces are not reused."""

    def __init__(self, path: Path, n_images: int, seed: int, seed_sets: int, spaces: list[str]) -> None:
        self.path, self.spaces = path, spaces
        self.tag = {"num_images": n_images, "seed": seed, "seed_sets": seed_sets, "spaces": spaces}
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("tag") == self.tag:
                    self.rows[entry["key"]] = entry["row"]

    @staticmethod
    def key(model: LoadedModel, steps: int, k: int | None, g: float) -> str:
        return f"{weights_hash(model.path)}:{steps}:{k}:{g:g}"

    def get(self, key: str) -> SweepRow | None:
        return SweepRow(**self.rows[key]) if key in self.rows else None

    def put(self, key: str, row: SweepRow) -> None:
        self.rows[key] = asdict(row)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "tag": self.tag, "row": asdict(row)}) + "\n")


def best_guidance_report(rows: list[SweepRow], default_steps: int, spaces: list[str]) -> str:
    """The section "each model at its best guidance": per feature space, the best rows and the comparisons from
    them, then where the two spaces agree and where they do not."""
    out = ["", "## Each model at its best guidance (per steps and K, over the guidance scales swept)", ""]
    verdicts: dict[str, list[str]] = {}
    for space in spaces:
        best = sorted(best_guidance(rows, space), key=lambda r: (r.model, r.gflops_per_image))
        out += [f"### In the `{space}` feature space", "", markdown_table(best), ""]
        verdicts[space] = comparisons(best, default_steps, None, space)
        out += verdicts[space] + [""]
    if len(spaces) > 1:
        agree = [a.split(":")[0] for a, b in zip(*verdicts.values(), strict=False)
                 if ("not lower" in a) == ("not lower" in b) and ("no dual-rate row" in a) == ("no dual-rate row" in b)]
        out += ["### Where the feature spaces agree", "",
                f"{len(agree)} of {min(map(len, verdicts.values()))} statements above come out the same way in both "
                "feature spaces (the FLOPs ratios may differ); a claim counts only where they do.", ""]
    return "\n".join(out) + "\n"


def pareto_plot(rows: list[SweepRow], path: Path, spaces: list[str], title: str) -> None:
    """FID against FLOPs per image, each model at its best guidance per point, one panel per feature space, with each
    model's Pareto front (the points no cheaper point beats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spaces), figsize=(7 * len(spaces), 5), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        best = [r for r in best_guidance(rows, space) if r.encoder_interval is not None or r.model != "dual-rate"]
        for model, marker in zip(dict.fromkeys(r.model for r in best), "os^vD", strict=False):
            pts = sorted((r for r in best if r.model == model), key=lambda r: r.gflops_per_image)
            x = [r.gflops_per_image for r in pts]
            y = [r.in_space(space)[0] for r in pts]
            ax.errorbar(x, y, yerr=[r.in_space(space)[1] for r in pts], fmt=marker, capsize=2, label=model, alpha=0.8)
            front, low = [], math.inf
            for r, fid in zip(pts, y, strict=True):
                if fid < low:
                    front.append((r.gflops_per_image, fid))
                    low = fid
            ax.plot(*zip(*front, strict=True), "-", alpha=0.5)
            for r, fid in zip(pts, y, strict=True):
                tag = f"N{r.steps}" + ("" if r.model != "dual-rate" else f" K{r.encoder_interval}") + f" g{r.guidance_scale:g}"
                ax.annotate(tag, (r.gflops_per_image, fid), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model GFLOPs per image (guided: cond + uncond)")
        ax.set_ylabel(f"FID ({space} features), best guidance, mean ± std")
        ax.set_title(f"{title}: each model at its best guidance ({space} features)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
