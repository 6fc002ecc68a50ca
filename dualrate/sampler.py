"""The reference dual-rate sampler: a short pure function over any `encode` / `denoise` pair.

The encoder runs at steps i = 0, K, 2K, ... on the current sample z_{t_i} (so tau = t_i); the light denoiser runs
at every step with the most recent features. Classifier-free guidance runs both networks on conditional and
unconditional rows. Each image's noise is a function of its seed and the step (`draw_noise`), so its result does
not depend on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from dualrate.diffusion import CosineSchedule, ancestral_step, step_times, x_from_prediction

Features = tuple[Tensor, ...]
EncodeFn = Callable[[Tensor, Tensor, Tensor], Features]  # (z, tau, label) -> features
DenoiseFn = Callable[[Tensor, Tensor, Tensor, Tensor, Features], Tensor]  # (z, t, tau, label, features) -> v


@dataclass
class SampleStats:
    encoder_calls: int  # per image (a guided image's cond + uncond rows count once)
    denoiser_calls: int


_M32 = 0xFFFFFFFF


def _mulmod32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (split into 16-bit halves)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


@lru_cache(maxsize=16)
def _element_keys(half: int, device: str) -> Tensor:
    return _mix32(torch.arange(half, dtype=torch.int64, device=device))


def draw_noise(seeds: Sequence[int] | Tensor, draw: Sequence[int] | Tensor,
               shape: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise of `shape` per image, a pure function of (the image's seed, the draw index): draw 0 is
    the starting sample, draw i + 1 the noise of step i. Counter-based (a hash of seed, draw and element index, then
    Box-Muller), so an image's noise does not depend on its batch, needs no generator state, and is drawn for a whole
    batch at once on any device. -> (B, C, S, S) float32."""
    dev = torch.device(device)
    seed = torch.as_tensor(seeds, dtype=torch.int64).to(dev)
    key = _mix32(_mix32(_mix32(seed & _M32) ^ ((seed >> 32) & _M32)) ^ (torch.as_tensor(draw, dtype=torch.int64).to(dev) & _M32))
    n = shape[0] * shape[1] * shape[2]
    half = (n + 1) // 2
    idx = _element_keys(half, str(dev))  # (half,)
    a = _mix32(key[:, None] ^ idx[None])
    b = _mix32(a ^ 0x9E3779B9)
    u1 = ((a >> 8).float() + 0.5) / 16777216.0  # (0, 1), 24 bits
    u2 = (b >> 8).float() / 16777216.0
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]
    return z.reshape(-1, *shape)


def encoder_due(step: int, encoder_interval: int) -> bool:
    """The encoder refreshes the features at steps 0, K, 2K, ..."""
    return step % encoder_interval == 0


def needs_uncond_row(label: int, guidance_scale: float, null_label: int) -> bool:
    """Classifier-free guidance runs an unconditional row beside a conditional image's row when g != 1."""
    return guidance_scale != 1.0 and label != null_label


def rows_per_image(label: int, guidance_scale: float, null_label: int) -> int:
    """Network rows one image takes per call: 2 when guided (conditional + unconditional), else 1."""
    return 2 if needs_uncond_row(label, guidance_scale, null_label) else 1


def guided_v(v_cond: Tensor, v_uncond: Tensor, guidance: Tensor | float) -> Tensor:
    """Classifier-free guidance per image: v = v_uncond + g (v_cond - v_uncond) (an unguided image passes
    v_uncond = v_cond). guidance: scalar or (B,)."""
    g = guidance.view(-1, *([1] * (v_cond.dim() - 1))) if isinstance(guidance, Tensor) else guidance
    return v_uncond + g * (v_cond - v_uncond)


def guided_step(z: Tensor, v_cond: Tensor, v_uncond: Tensor, guidance: Tensor | float, t: Tensor, s: Tensor,
                sched: CosineSchedule, noise: Tensor, prediction: str = "v") -> Tensor:
    """The one step function of every sampler here (reference, CLI, service): combine the guided prediction per image
    (`guided_v`; linear, so the same for v, eps and x0), then take the ancestral step from t to s on its x_hat with
    the image's own noise. z, v_*, noise: (B, C, H, W); t, s: (B,); guidance: scalar or (B,)."""
    return ancestral_step(z, guided_v(v_cond, v_uncond, guidance), t, s, sched, noise, prediction)


def preview_x0(z: Tensor, v_cond: Tensor, v_uncond: Tensor, guidance: Tensor | float, t: Tensor,
               sched: CosineSchedule, prediction: str = "v") -> Tensor:
    """The current estimate of the final image, x0_hat (of the guided prediction), clamped to [-1, 1]: what a
    progress preview shows. Same arguments as `guided_step`, before the step."""
    return x_from_prediction(z, guided_v(v_cond, v_uncond, guidance), t, sched, prediction).clamp(-1.0, 1.0)


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
    *,
    sample_shape: tuple[int, int, int],  # (C, S, S): ModelConfig.sample_shape
    feature_shapes: Sequence[tuple[int, int, int]] | None = None,  # set = control: zeroed features, no encoder
    refresh_steps: Sequence[int] | None = None,  # set = the encoder runs at these steps instead (must include 0)
    device: str | torch.device = "cpu",  # where z lives: an engine's device keeps the loop free of host copies
    prediction: str = "v",  # what `denoise` predicts: v, eps or x0 (dualrate.diffusion.x_from_prediction)
) -> tuple[Tensor, SampleStats]:
    """Ancestral dual-rate sampling. Returns samples (B, C, S, S) in [-1, 1] and per-image call counts.
    `refresh_steps` replaces the fixed interval by any schedule (e.g. K = 4, then K = 8 from step 16: 0, 4, 8, 12,
    16, 24), for studying a change of K within a trajectory."""
    assert steps >= 1 and encoder_interval >= 1 and len(seeds) == labels.shape[0]
    assert refresh_steps is None or 0 in refresh_steps, "the first step needs features"
    due = set(refresh_steps) if refresh_steps is not None else {i for i in range(steps) if encoder_due(i, encoder_interval)}
    seeds = list(seeds)
    b = labels.shape[0]
    guided = any(needs_uncond_row(int(y), guidance_scale, null_label) for y in labels)
    labels = labels.to(device)
    rows = torch.cat([labels, torch.full_like(labels, null_label)]) if guided else labels  # (R,)
    times = step_times(steps).float().to(device)
    z = draw_noise(seeds, [0] * b, sample_shape, device)  # (B, C, S, S)
    seed_t = torch.tensor(seeds, dtype=torch.int64, device=device)
    feats: Features = ()
    tau = torch.ones(b, device=device)
    enc_calls = 0
    for i in range(steps):
        t, s = times[i].expand(b), times[i + 1].expand(b)
        zz = torch.cat([z, z]) if guided else z
        if feature_shapes is not None:
            tau = t
            feats = tuple(torch.zeros(rows.shape[0], *shape, device=device) for shape in feature_shapes)
        elif i in due:
            tau = t
            feats = encode(zz, torch.cat([tau, tau]) if guided else tau, rows)
            enc_calls += 1
        tt, tautau = (torch.cat([t, t]), torch.cat([tau, tau])) if guided else (t, tau)
        v = denoise(zz, tt, tautau, rows, feats).to(z.device).float()  # engines may return device tensors
        # Unconditional images in a guided batch get the same v from both rows, so guidance leaves them as they are.
        v_cond, v_uncond = v.chunk(2) if guided else (v, v)
        noise = draw_noise(seed_t, torch.full_like(seed_t, i + 1), sample_shape, device)
        z = guided_step(z, v_cond, v_uncond, guidance_scale, t, s, sched, noise, prediction)
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
    *,
    sample_shape: tuple[int, int, int],
) -> tuple[Tensor, SampleStats]:
    """`dual_rate_sample` over chunks whose network calls hold at most `max_rows` rows (a guided image takes two),
    for engines with a batch limit. An image's noise is a function of its seed and step, so the images do not depend
    on the chunking."""
    guided = any(needs_uncond_row(int(y), guidance_scale, null_label) for y in labels)
    per_call = max_rows // 2 if guided else max_rows
    if per_call < 1:
        raise ValueError(f"max_rows {max_rows} cannot hold one guided image (two rows)")
    out, stats = [], SampleStats(0, steps)
    for i in range(0, labels.shape[0], per_call):
        z, stats = dual_rate_sample(encode, denoise, labels[i : i + per_call], seeds[i : i + per_call], steps,
                                    encoder_interval, guidance_scale, sched, null_label, sample_shape=sample_shape)
        out.append(z)
    return torch.cat(out), stats
