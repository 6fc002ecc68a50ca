"""A sweep: rows of (steps N, interval K, guidance) per model, each over disjoint seed sets, measured with the
evaluator and kept row by row (`RowStore`, OUT/rows.jsonl) so a stopped sweep resumes."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dualrate.checkpoint import LoadedModel, torch_fns, weights_hash
from dualrate.diffusion import CosineSchedule
from dualrate.eval.fid import Evaluator
from dualrate.nets import per_image_flops
from dualrate.sampler import dual_rate_sample, rows_per_image

log = logging.getLogger("dualrate.eval")


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
