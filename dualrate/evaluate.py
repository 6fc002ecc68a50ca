"""The project's evaluator: FID in the digit classifier's feature space, class accuracy, sample grids, and a sweep.

    python -m dualrate.evaluate --num-images 1000 --out docs

The sweep reports, per (steps N, interval K, guidance), FID against the MNIST test set, class accuracy of the
conditional samples, counted model FLOPs per image and images/s measured on this machine, as a markdown table and
a plot of FID against FLOPs. Two control rows: K = N (one encoder call per image) and the light network with
zeroed features (no encoder at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import Tensor
from tqdm import tqdm

from dualrate.checkpoint import CARD_FILE, DEFAULT_CHECKPOINT, LoadedModel, load_checkpoint, torch_fns
from dualrate.classifier import CLASSIFIER_DIR, DigitClassifier, batched, load_classifier
from dualrate.data import load_mnist, to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.nets import per_image_flops
from dualrate.provenance import command_line, provenance
from dualrate.sampler import dual_rate_sample

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
        """images (B, 1, 32, 32) in [-1, 1]; re-quantized to uint8 as the service would serve them."""
        mu, cov = feature_stats(batched(self.net.features, quantize(images)))
        return frechet_distance(mu, cov, self.ref_mu, self.ref_cov)

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return (batched(self.net, quantize(images)).argmax(1) == labels).float().mean().item()


def quantize(images: Tensor) -> Tensor:
    """Round-trip through the served uint8 28x28 image, padded back to 32x32."""
    return from_pictures(to_uint8(images))


def from_pictures(pictures: np.ndarray) -> Tensor:
    """Served MNIST pictures, uint8 (B, 28, 28) (decoded PNGs) -> the evaluator's input (B, 1, 32, 32) in [-1, 1]."""
    u8 = torch.from_numpy(np.asarray(pictures)).float() / 127.5 - 1.0
    return torch.nn.functional.pad(u8[:, None], (2, 2, 2, 2), value=-1.0)


def save_grid(images: Tensor, path: Path, nrow: int = 10, scale: int = 2) -> None:
    """Save (B, 1, 32, 32) images as one PNG grid of 28x28 tiles."""
    tiles = to_uint8(images)  # (B, 28, 28)
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
    fid: float
    accuracy: float
    encoder_calls: int
    gflops_per_image: float
    images_per_s: float
    note: str = ""


def generate(
    model: LoadedModel, n: int, steps: int, k: int | None, g: float, seed: int = 10_000, batch: int = 250,
    refresh_steps: list[int] | None = None, seeds: list[int] | None = None, labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, int]:
    """n conditional images, labels 0..9 in turn and seeds seed, seed + 1, ... (or the given `seeds` and `labels`,
    e.g. those of images a server returned). Returns images, labels, seconds, encoder calls per image."""
    encode, denoise = torch_fns(model)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(n) % 10 if labels is None else labels
    all_seeds = [seed + j for j in range(n)] if seeds is None else seeds
    out, calls = [], 0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        lab = labels[i : i + batch]
        imgs, stats = dual_rate_sample(
            encode, denoise, lab, all_seeds[i : i + len(lab)], steps, k or steps, g, sched,
            model.cfg.null_label, feature_shapes=model.cfg.feature_shapes if k is None else None,
            refresh_steps=refresh_steps,
        )
        out.append(imgs)
        calls = 0 if k is None else stats.encoder_calls
    return torch.cat(out), labels, time.perf_counter() - t0, calls


def sweep_configs(default_steps: int, default_g: float) -> list[tuple[int, int | None, float, str]]:
    n = default_steps
    rows: list[tuple[int, int | None, float, str]] = [(n, k, default_g, "") for k in (1, 2, 4, 8, 16)]
    rows += [(n, n, default_g, "control: K = N, one encoder call"), (n, None, default_g, "control: zeroed features")]
    rows += [(n, 4, g, "guidance") for g in (1.0, 2.0, 3.0) if g != default_g]
    # Other step counts (N = 64 at K = 1 is left out: it costs as much as the rest of the sweep together).
    rows += [(16, 1, default_g, ""), (16, 4, default_g, ""), (64, 4, default_g, ""), (64, 8, default_g, ""),
             (64, 16, default_g, "")]
    return rows


def run_sweep(model: LoadedModel, ev: Evaluator, n_images: int, configs, seed: int = 10_000) -> list[SweepRow]:
    enc_f, den_f = per_image_flops(model.cfg)
    rows = []
    for steps, k, g, note in tqdm(configs, desc="sweep"):
        imgs, labels, secs, calls = generate(model, n_images, steps, k, g, seed=seed)
        mult = 2 if g != 1.0 else 1  # guided images run cond + uncond rows
        flops = mult * (calls * enc_f + steps * den_f)
        row = SweepRow(steps, k, g, ev.fid(imgs), ev.accuracy(imgs, labels), calls, flops / 1e9, n_images / secs, note)
        log.info("%s", row)
        rows.append(row)
    return rows


def markdown_table(rows: list[SweepRow]) -> str:
    lines = ["| steps N | K | guidance | FID | accuracy | encoder calls | GFLOPs/image | images/s | note |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        k = "none (zeroed)" if r.encoder_interval is None else str(r.encoder_interval)
        lines.append(f"| {r.steps} | {k} | {r.guidance_scale:g} | {r.fid:.2f} | {100 * r.accuracy:.1f}% | "
                     f"{r.encoder_calls} | {r.gflops_per_image:.2f} | {r.images_per_s:.1f} | {r.note} |")
    return "\n".join(lines)


def plot(rows: list[SweepRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for steps in sorted({r.steps for r in rows}):
        sel = [r for r in rows if r.steps == steps and r.encoder_interval is not None and r.note != "guidance"]
        sel.sort(key=lambda r: r.gflops_per_image)
        ax.plot([r.gflops_per_image for r in sel], [r.fid for r in sel], "o-", label=f"N = {steps}")
        for r in sel:
            ax.annotate(f"K={r.encoder_interval}", (r.gflops_per_image, r.fid), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for r in rows:
        if r.encoder_interval is None:
            ax.plot([r.gflops_per_image], [r.fid], "kx", label=f"zeroed features (N = {r.steps})")
    ax.set_xscale("log")
    ax.set_xlabel("model GFLOPs per image (counted)")
    ax.set_ylabel("FID (classifier features, vs MNIST test)")
    ax.set_title("Dual-Rate Diffusion on MNIST: quality vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--num-images", type=int, default=1000, help="samples per sweep row (FID against 10k test)")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--update-card", action="store_true", help="write the default row's figures into the model card")
    p.add_argument("--check", action="store_true",
                   help="only K = 1, 4, 8 and zeroed features at the default steps, side by side with the committed "
                   "sweep.json: writes check.md / check.json (e.g. after a change to the sampler's noise)")
    p.add_argument("--seed", type=int, default=10_000, help="--check: first seed of the sample set (sweep.json: 10000)")
    p.add_argument("--ks", default="1,4,8,zeroed", help="--check: the rows, K values or 'zeroed'")
    p.add_argument("--name", default="check", help="--check: output file name (<name>.md, <name>.json)")
    a = p.parse_args(argv)
    if a.check:
        check(a, argv)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    model = load_checkpoint(a.checkpoint)
    ev = Evaluator()
    d = model.defaults
    a.out.mkdir(parents=True, exist_ok=True)
    grid, _, _, _ = generate(model, 100, d.steps, d.encoder_interval, d.guidance_scale, seed=0, batch=100)
    save_grid(grid, a.out / "samples_grid.png")
    rows = run_sweep(model, ev, a.num_images, sweep_configs(d.steps, d.guidance_scale))
    table = markdown_table(rows)
    plot(rows, a.out / "fid_vs_flops.png")
    header = (f"Measured {date.today().isoformat()} on {platform.machine()} ({torch.get_num_threads()} threads), "
              f"{a.num_images} conditional samples per row (labels 0-9 in turn), FID against the 10k MNIST test set "
              f"in the project classifier's 128-d feature space.\n\nCommand: `python -m dualrate.evaluate "
              f"--num-images {a.num_images} --out {a.out}`\n\n")
    raw = ("Raw output: [sweep.json](sweep.json); date, machine, commit and checkpoint hash: "
           "[sweep.provenance.json](sweep.provenance.json).\n\n")
    (a.out / "sweep.md").write_text("# Sweep: steps, encoder interval, guidance\n\n" + raw + header + table + "\n")
    (a.out / "sweep.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    command = command_line("python -m dualrate.evaluate", argv)
    (a.out / "sweep.provenance.json").write_text(json.dumps(provenance(a.checkpoint, command), indent=2) + "\n")
    print(table)
    if a.update_card:
        card_path = a.checkpoint / CARD_FILE
        card = json.loads(card_path.read_text())
        card["quality"] = {"measured": date.today().isoformat(), "num_images_per_row": a.num_images,
                           "sweep": [asdict(r) for r in rows]}
        card_path.write_text(json.dumps(card, indent=2) + "\n")


def check(a: argparse.Namespace, argv: list[str] | None) -> None:
    """The quality rows that matter most, against the committed sweep's same rows (same seeds, same evaluator)."""
    torch.set_grad_enabled(False)
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    ks = [None if k == "zeroed" else int(k) for k in a.ks.split(",")]
    configs = [(d.steps, k, d.guidance_scale, "" if k else "zeroed") for k in ks]
    rows = run_sweep(model, Evaluator(), a.num_images, configs, seed=a.seed)
    before = {(r["steps"], r["encoder_interval"], r["guidance_scale"]): r
              for r in json.loads((a.out / "sweep.json").read_text())}
    lines = ["| N | K | FID now | FID in sweep.json | ratio | accuracy now | accuracy before |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = before.get((r.steps, r.encoder_interval, r.guidance_scale))
        k = "zeroed" if r.encoder_interval is None else str(r.encoder_interval)
        lines.append(f"| {r.steps} | {k} | {r.fid:.2f} | {b['fid']:.2f} | {r.fid / b['fid']:.3f} | "
                     f"{100 * r.accuracy:.1f}% | {100 * b['accuracy']:.1f}% |" if b else f"| {r.steps} | {k} | {r.fid:.2f} | | | |")
    command = command_line("python -m dualrate.evaluate", argv)
    prov = provenance(a.checkpoint, command)
    (a.out / f"{a.name}.json").write_text(json.dumps({**prov, "seed": a.seed, "rows": [asdict(r) for r in rows]},
                                                     indent=2) + "\n")
    table = "\n".join(lines)
    (a.out / f"{a.name}.md").write_text(
        "# Quality check against the committed sweep\n\n"
        f"Raw output: [{a.name}.json]({a.name}.json) (date {prov['date']}, commit {prov['git_commit'][:12]}, checkpoint "
        f"sha256 {prov['checkpoint_sha256'][:12]}). Command: `{command}`; {a.num_images} conditional samples per row, "
        "first seed {a.seed} (sweep.json: 10000), the same evaluator as sweep.json.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
