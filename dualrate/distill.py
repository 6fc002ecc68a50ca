"""Few-step dual-rate students by moment matching distillation (Salimans, Mensink, Heek, Hoogeboom, 2024, "Multistep
Distillation of Diffusion Models via Moment Matching"), alternating form, for a trained dual-rate pair.

    python -m dualrate.distill --teacher checkpoints/mnist-dualrate --steps 8 --encoder-interval 2 \
        --out runs/mnist-8step --checkpoint checkpoints/mnist-dualrate-8step

The student is a dual-rate pair of the teacher's architecture, initialised from it, that samples in `--steps` steps
with the encoder refreshed every `--encoder-interval` of them (its features reused in between, as at inference). Each
training step, at one of the student's step times t (its encoder at the last refresh time tau >= t):

1. z_t ~ q(z_t | x) from the data, z_tau ~ q(z_tau | z_t) (the pair the dual-rate sampler produces);
   the student predicts x~ = x_student(z_t, t; encoder(z_tau, tau)), and z_s ~ q(z_s | z_t, x~) is its next state.
2. The auxiliary denoiser (a pair initialised from the teacher, encoder every step) learns E_student[x~ | z_s] by
   regression on the student's own x~ at z_s.
3. The student moves its conditional first moment towards the teacher's: the loss x~ . sg(aux(z_s) - teacher(z_s)),
   whose gradient is that of 1/2 |E_student[x | z_s] - E_teacher[x | z_s]|^2 through x~. At the last step (s = 0,
   where z_s = x~) the student's x~ is a point mass, whose first moment matches the teacher's when x~ = teacher(z_t):
   a regression on the teacher's prediction.

Guidance: the teacher's guided prediction (classifier-free guidance at `--guidance`, default the teacher card's) is
what the student matches, so the student samples unguided (guidance 1.0: one network row per image instead of two).
Labels are dropped to the null label at the teacher's rate, where the teacher's unconditional prediction is matched,
so unconditional requests work too. Resumable from OUT/state.pt; the card records the teacher and the options.
"""

from __future__ import annotations

from dualrate.research import require_research_extra

require_research_extra("dualrate.distill")  # before the imports that need it: one line, not a traceback

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dualrate.checkpoint import LoadedModel, checkpoint_hash, load_checkpoint, model_card, save_checkpoint
from dualrate.data import load_dataset
from dualrate.diffusion import CosineSchedule, _bc, posterior_sample, q_forward, q_sample, step_times, x_from_v
from dualrate.nets import ContextEncoder, LightDenoiser

log = logging.getLogger("dualrate.distill")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 8  # the student's sampling steps
    encoder_interval: int = 2  # the student's K: steps / K encoder calls per image
    guidance: float | None = None  # the teacher's guidance to distil (None: the teacher card's)
    train_steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-5  # the student's
    aux_lr: float = 1e-4  # the auxiliary denoiser's
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    checkpoint_every: int = 100
    log_every: int = 25
    seed: int = 0
    threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def x_pred(enc: ContextEncoder, den: LightDenoiser, z: Tensor, t: Tensor, z_tau: Tensor, tau: Tensor,
           label: Tensor, sched: CosineSchedule) -> Tensor:
    """A pair's x-prediction at z_t with features from z_tau at tau (tau = t: encoder on the same sample)."""
    feats = enc(z_tau, tau, label)
    return x_from_v(z, den(z, t, tau, label, *feats).float(), t, sched)


def teacher_x(teacher: LoadedModel, z: Tensor, t: Tensor, label: Tensor, guidance: float, sched: CosineSchedule) -> Tensor:
    """The teacher's guided x-prediction (its encoder on z, every step): x_u + g (x_c - x_u) for labelled rows, x_u for
    null-label rows."""
    null = torch.full_like(label, teacher.cfg.null_label)
    both = x_pred(teacher.encoder, teacher.denoiser, torch.cat([z, z]), torch.cat([t, t]), torch.cat([z, z]),
                  torch.cat([t, t]), torch.cat([label, null]), sched)
    x_c, x_u = both.chunk(2)
    g = torch.where(label == teacher.cfg.null_label, 1.0, guidance).to(z.dtype)
    return x_u + _bc(g, z) * (x_c - x_u)


def distill_step(student: tuple[ContextEncoder, LightDenoiser], aux: tuple[ContextEncoder, LightDenoiser],
                 teacher: LoadedModel, x: Tensor, label: Tensor, cfg: DistillConfig, guidance: float,
                 sched: CosineSchedule, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One alternating update's losses on a batch: (the student's, the auxiliary denoiser's, and the moment mismatch
    |aux(z_s) - teacher(z_s)|^2 per pixel that the student's loss pushes down, for the log)."""
    b = x.shape[0]
    null = teacher.cfg.null_label
    label = torch.where(torch.rand(b, generator=gen) < cfg.label_dropout, torch.full_like(label, null), label)
    times = step_times(cfg.steps).float()
    i = torch.randint(0, cfg.steps, (b,), generator=gen)
    t, s, tau = times[i], times[i + 1], times[i - i % cfg.encoder_interval]
    z_t = q_sample(x, t, sched, torch.randn(x.shape, generator=gen))
    z_tau = q_forward(z_t, t, tau, sched, torch.randn(x.shape, generator=gen))
    x_s = x_pred(*student, z_t, t, z_tau, tau, label, sched)  # the student's x~, with gradient
    last = s <= 0
    # Not the last step: z_s from the student's own posterior; the last step regresses on the teacher at z_t.
    s_safe = torch.where(last, times[cfg.steps - 1], s)
    z_s = posterior_sample(z_t, x_s.detach(), t, s_safe, sched, torch.randn(x.shape, generator=gen))
    aux_x = x_pred(*aux, z_s, s_safe, z_s, s_safe, label, sched)
    aux_loss = F.mse_loss(aux_x, x_s.detach())
    with torch.no_grad():
        # One guided teacher call for the batch: at z_s for the moment rows, at z_t for the last-step rows.
        z_teach, t_teach = torch.where(_bc(last, x), z_t, z_s), torch.where(last, t, s_safe)
        teach = teacher_x(teacher, z_teach, t_teach, label, guidance, sched)
        target_next = aux_x.detach() - teach
        target_last = teach
    per_row_mm = (x_s * target_next).flatten(1).mean(1)  # its gradient: the moment mismatch through x~
    per_row_last = (x_s - target_last).pow(2).flatten(1).mean(1)
    student_loss = torch.where(last, per_row_last, per_row_mm).mean()
    mismatch = target_next.pow(2).flatten(1).mean(1)[~last].mean() if bool((~last).any()) else torch.zeros(())
    return student_loss, aux_loss, mismatch


def _pair(model: LoadedModel) -> tuple[ContextEncoder, LightDenoiser]:
    """A trainable copy of a model's pair (the teacher's own weights are frozen)."""
    enc, den = copy.deepcopy(model.encoder).train(), copy.deepcopy(model.denoiser).train()
    for p in (*enc.parameters(), *den.parameters()):
        p.requires_grad_(True)
    return enc, den


def main(teacher_path: Path, cfg: DistillConfig, out: Path, checkpoint: Path | None, snapshot_every: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_options.json").write_text(json.dumps({"teacher": str(teacher_path), **cfg.to_dict()}, indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.steps % cfg.encoder_interval:
        raise SystemExit(f"--steps {cfg.steps} is no multiple of --encoder-interval {cfg.encoder_interval}")
    teacher = load_checkpoint(teacher_path)
    if teacher.cfg.standalone:
        raise SystemExit(f"{teacher_path} is a standalone model: distil a dual-rate pair")
    for p in (*teacher.encoder.parameters(), *teacher.denoiser.parameters()):
        p.requires_grad_(False)
    guidance = teacher.defaults.guidance_scale if cfg.guidance is None else cfg.guidance
    sched = CosineSchedule(teacher.cfg.logsnr_min, teacher.cfg.logsnr_max)
    torch.manual_seed(cfg.seed)
    student, aux = _pair(teacher), _pair(teacher)
    ema = tuple(copy.deepcopy(n).eval() for n in student)
    s_params = [p for n in student for p in n.parameters()]
    a_params = [p for n in aux for p in n.parameters()]
    opt_s = torch.optim.Adam(s_params, lr=cfg.lr, betas=(0.0, 0.99))
    opt_a = torch.optim.Adam(a_params, lr=cfg.aux_lr, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history = 0, 0.0, []
    state_path = out / "state.pt"
    modules = {"student_encoder": student[0], "student_denoiser": student[1], "aux_encoder": aux[0],
               "aux_denoiser": aux[1], "ema_encoder": ema[0], "ema_denoiser": ema[1]}
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        for name, m in modules.items():
            m.load_state_dict(st[name])
        opt_s.load_state_dict(st["opt_student"])
        opt_a.load_state_dict(st["opt_aux"])
        gen.set_state(st["gen"])
        step, elapsed, history = st["step"], st["elapsed"], st["history"]
        log.info("resumed from %s at step %d (%.0f s trained)", state_path, step, elapsed)
    dataset = (teacher.card.get("data") or {}).get("name") or "mnist"
    x_all, y_all = load_dataset(dataset, "train")

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({**{n: m.state_dict() for n, m in modules.items()}, "opt_student": opt_s.state_dict(),
                    "opt_aux": opt_a.state_dict(), "gen": gen.get_state(), "step": step, "elapsed": elapsed,
                    "history": history}, tmp)
        tmp.replace(state_path)

    def write_student(path: Path) -> None:
        """The student's EMA weights as an ordinary checkpoint, its card naming the teacher and the options."""
        card = model_card(teacher.cfg, path.name, data=teacher.card.get("data", {}),
                          training={"distilled": True, **cfg.to_dict(), "guidance": guidance, "trained_steps": step,
                                    "seconds": round(elapsed, 1), "machine": f"{os.cpu_count()} CPU cores"})
        card["defaults"] = {"steps": cfg.steps, "encoder_interval": cfg.encoder_interval, "guidance_scale": 1.0}
        card["distilled"] = {"method": "moment matching distillation (alternating), Salimans et al. 2024",
                             "teacher": teacher.card.get("name", teacher_path.name),
                             "teacher_sha256": checkpoint_hash(teacher_path), "steps": cfg.steps,
                             "encoder_interval": cfg.encoder_interval, "teacher_guidance": guidance,
                             "train_steps": step, "batch_size": cfg.batch_size}
        card["method"] = (f"Dual-Rate Diffusion (arXiv 2605.18190), distilled to {cfg.steps} steps with the encoder every "
                          f"{cfg.encoder_interval} by moment matching from {card['distilled']['teacher']}")
        save_checkpoint(path, ema[0], ema[1], card)  # type: ignore[arg-type]

    bar = tqdm(total=cfg.train_steps, initial=step, desc="distill", unit="step", mininterval=5.0)
    run_m = run_a = None
    while step < cfg.train_steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=gen)
        student_loss, aux_loss, mismatch = distill_step(student, aux, teacher, x_all[idx], y_all[idx], cfg, guidance, sched, gen)
        opt_a.zero_grad(set_to_none=True)
        aux_loss.backward()
        torch.nn.utils.clip_grad_norm_(a_params, 1.0)
        opt_a.step()
        opt_s.zero_grad(set_to_none=True)
        student_loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, 1.0)
        opt_s.step()
        with torch.no_grad():
            for e, m in zip(ema, student, strict=True):
                for pe, pm in zip(e.parameters(), m.parameters(), strict=True):
                    pe.lerp_(pm, 1.0 - cfg.ema_decay)
        step += 1
        elapsed += time.perf_counter() - t0
        run_m = mismatch.item() if run_m is None else 0.95 * run_m + 0.05 * mismatch.item()
        run_a = aux_loss.item() if run_a is None else 0.95 * run_a + 0.05 * aux_loss.item()
        bar.update(1)
        bar.set_postfix(mismatch=f"{run_m:.5f}", aux=f"{run_a:.4f}")
        if step % cfg.log_every == 0:
            history.append((step, run_m, run_a))
            log.info("step %d moment mismatch %.6f aux loss %.5f %.2f s/step", step, run_m, run_a, elapsed / step)
        if step % cfg.checkpoint_every == 0 or step == cfg.train_steps:
            save_state()
        if snapshot_every and step % snapshot_every == 0 and step < cfg.train_steps:
            write_student(out / "snapshots" / f"step-{step:05d}")
    bar.close()
    if checkpoint is not None:
        write_student(checkpoint)
        log.info("wrote the student's EMA checkpoint to %s", checkpoint)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True, help="the dual-rate checkpoint to distil")
    p.add_argument("--out", type=Path, required=True, help="run folder (state.pt, options, logs)")
    p.add_argument("--checkpoint", type=Path, default=None, help="where to write the student at the end")
    d = DistillConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="the student's sampling steps")
    p.add_argument("--encoder-interval", type=int, default=d.encoder_interval, help="the student's K")
    p.add_argument("--guidance", type=float, default=None, help="the teacher's guidance to distil (default: its card's)")
    p.add_argument("--train-steps", type=int, default=d.train_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--aux-lr", type=float, default=d.aux_lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="S",
                   help="also write the student's EMA weights every S steps to OUT/snapshots/step-NNNNN (0: none)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DistillConfig(steps=a.steps, encoder_interval=a.encoder_interval, guidance=a.guidance,
                        train_steps=a.train_steps, batch_size=a.batch_size, lr=a.lr, aux_lr=a.aux_lr, seed=a.seed,
                        threads=a.threads)
    main(a.teacher, cfg, a.out, a.checkpoint, a.snapshot_every)


if __name__ == "__main__":
    cli()
