"""The reference dual-rate sampler: a short pure function over any `encode` / `denoise` pair.

The encoder runs at steps i = 0, K, 2K, ... on the current sample z_{t_i} (so tau = t_i); the light denoiser runs
at every step with the most recent features. Classifier-free guidance runs both networks on conditional and
unconditional rows. Each image owns its generator (seed + i), so its result does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dualrate.diffusion import CosineSchedule, ancestral_step, step_times

Features = tuple[Tensor, ...]
EncodeFn = Callable[[Tensor, Tensor, Tensor], Features]  # (z, tau, label) -> features
DenoiseFn = Callable[[Tensor, Tensor, Tensor, Tensor, Features], Tensor]  # (z, t, tau, label, features) -> v


@dataclass
class SampleStats:
    encoder_calls: int  # per image (a guided image's cond + uncond rows count once)
    denoiser_calls: int


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_noise(gens: Sequence[torch.Generator], image_size: int = 32) -> Tensor:
    """One (1, S, S) standard normal draw per image from its own generator -> (B, 1, S, S)."""
    return torch.stack([torch.randn(1, image_size, image_size, generator=g) for g in gens])


def encoder_due(step: int, encoder_interval: int) -> bool:
    """The encoder refreshes the features at steps 0, K, 2K, ..."""
    return step % encoder_interval == 0


@torch.no_grad()
def dual_rate_sample(
    encode: EncodeFn,
    denoise: DenoiseFn,
    labels: Tensor,  # (B,) int64; null_label = unconditional
    seeds: Sequence[int],
    steps: int,
    encoder_interval: int,
    guidance_scale: float,
    sched: CosineSchedule,
    null_label: int,
    feature_shapes: Sequence[tuple[int, int, int]] | None = None,  # set = control: zeroed features, no encoder
    image_size: int = 32,
) -> tuple[Tensor, SampleStats]:
    """Ancestral dual-rate sampling. Returns images (B, 1, S, S) in [-1, 1] and per-image call counts."""
    assert steps >= 1 and encoder_interval >= 1 and len(seeds) == labels.shape[0]
    gens = image_generators(seeds)
    b = labels.shape[0]
    guided = guidance_scale != 1.0 and bool((labels != null_label).any())
    rows = torch.cat([labels, torch.full_like(labels, null_label)]) if guided else labels  # (R,)
    times = step_times(steps).float()
    z = draw_noise(gens, image_size)  # (B, 1, S, S)
    feats: Features = ()
    tau = torch.ones(b)
    enc_calls = 0
    for i in range(steps):
        t, s = times[i].expand(b), times[i + 1].expand(b)
        zz = torch.cat([z, z]) if guided else z
        if feature_shapes is not None:
            tau = t
            feats = tuple(torch.zeros(rows.shape[0], *shape) for shape in feature_shapes)
        elif encoder_due(i, encoder_interval):
            tau = t
            feats = encode(zz, torch.cat([tau, tau]) if guided else tau, rows)
            enc_calls += 1
        tt, tautau = (torch.cat([t, t]), torch.cat([tau, tau])) if guided else (t, tau)
        v = denoise(zz, tt, tautau, rows, feats).to(z.device).float()  # engines may return device tensors
        if guided:
            v_cond, v_uncond = v.chunk(2)
            # Unconditional images keep their plain prediction (v_cond == v_uncond for them).
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        z = ancestral_step(z, v, t, s, sched, draw_noise(gens, image_size))
    return z, SampleStats(encoder_calls=enc_calls, denoiser_calls=steps)



def sample_in_batches(
    encode: EncodeFn,
    denoise: DenoiseFn,
    labels: Tensor,
    seeds: Sequence[int],
    steps: int,
    encoder_interval: int,
    guidance_scale: float,
    sched: CosineSchedule,
    null_label: int,
    max_rows: int,
    image_size: int = 32,
) -> tuple[Tensor, SampleStats]:
    """`dual_rate_sample` over chunks whose network calls hold at most `max_rows` rows (a guided image takes two),
    for engines with a batch limit. Each image owns its generator, so the images do not depend on the chunking."""
    guided = guidance_scale != 1.0 and bool((labels != null_label).any())
    per_call = max_rows // 2 if guided else max_rows
    if per_call < 1:
        raise ValueError(f"max_rows {max_rows} cannot hold one guided image (two rows)")
    out, stats = [], SampleStats(0, steps)
    for i in range(0, labels.shape[0], per_call):
        z, stats = dual_rate_sample(encode, denoise, labels[i : i + per_call], seeds[i : i + per_call], steps,
                                    encoder_interval, guidance_scale, sched, null_label, image_size=image_size)
        out.append(z)
    return torch.cat(out), stats
