"""Variance-preserving diffusion math: cosine log-SNR schedule, v-prediction, forward chain, ancestral step.

alpha_t^2 + sigma_t^2 = 1 and alpha_t^2 = sigmoid(logsnr(t)). Time is continuous, t in [0, 1]; t = 0 is data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class CosineSchedule:
    """Cosine log-SNR schedule, logsnr(t) = -2 log tan(pi t / 2), squashed into [logsnr_min, logsnr_max]."""

    def __init__(self, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> None:
        self.logsnr_min = logsnr_min
        self.logsnr_max = logsnr_max
        # t -> [t_min, t_max] so that the end points hit the log-SNR limits exactly.
        self.t_min = math.atan(math.exp(-0.5 * logsnr_max))
        self.t_max = math.atan(math.exp(-0.5 * logsnr_min))

    def logsnr(self, t: Tensor) -> Tensor:
        angle = self.t_min + t.double() * (self.t_max - self.t_min)
        return (-2.0 * torch.log(torch.tan(angle))).to(t.dtype)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ls = self.logsnr(t.double())
        return torch.sigmoid(ls).sqrt().to(t.dtype), torch.sigmoid(-ls).sqrt().to(t.dtype)


def _bc(x: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-row (B,) tensor against (B, C, H, W)."""
    return x.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x: Tensor, t: Tensor, sched: CosineSchedule, noise: Tensor) -> Tensor:
    """z_t ~ q(z_t | x) = N(alpha_t x, sigma_t^2 I)."""
    a, s = sched.alpha_sigma(t)
    return _bc(a, x) * x + _bc(s, x) * noise


def transition(t: Tensor, tau: Tensor, sched: CosineSchedule) -> tuple[Tensor, Tensor]:
    """alpha_{tau|t}, sigma_{tau|t} of q(z_tau | z_t) for tau >= t (forward Markov chain)."""
    a_t, s_t = sched.alpha_sigma(t.double())
    a_tau, s_tau = sched.alpha_sigma(tau.double())
    a_ts = a_tau / a_t
    var = (s_tau**2 - a_ts**2 * s_t**2).clamp_min(0.0)
    return a_ts.to(t.dtype), var.sqrt().to(t.dtype)


def q_forward(z_t: Tensor, t: Tensor, tau: Tensor, sched: CosineSchedule, noise: Tensor) -> Tensor:
    """z_tau ~ q(z_tau | z_t): the pair (z_t, z_tau) then has the distribution the ancestral sampler produces."""
    a, s = transition(t, tau, sched)
    return _bc(a, z_t) * z_t + _bc(s, z_t) * noise


def v_target(x: Tensor, noise: Tensor, t: Tensor, sched: CosineSchedule) -> Tensor:
    """v = alpha_t eps - sigma_t x."""
    a, s = sched.alpha_sigma(t)
    return _bc(a, x) * noise - _bc(s, x) * x


def x_from_v(z: Tensor, v: Tensor, t: Tensor, sched: CosineSchedule) -> Tensor:
    a, s = sched.alpha_sigma(t)
    return _bc(a, z) * z - _bc(s, z) * v


def eps_from_v(z: Tensor, v: Tensor, t: Tensor, sched: CosineSchedule) -> Tensor:
    a, s = sched.alpha_sigma(t)
    return _bc(s, z) * z + _bc(a, z) * v


PREDICTIONS = ("v", "eps", "x0")  # what a denoiser predicts (a model card's diffusion.prediction)


def x_from_prediction(z: Tensor, pred: Tensor, t: Tensor, sched: CosineSchedule, prediction: str = "v") -> Tensor:
    """x_hat from a network's prediction at time t: v (x = alpha z - sigma v), eps (x = (z - sigma eps) / alpha) or
    x0 (the prediction itself). Not clamped."""
    if prediction == "v":
        return x_from_v(z, pred, t, sched)
    if prediction == "eps":
        a, s = sched.alpha_sigma(t)
        return (z - _bc(s, z) * pred) / _bc(a, z)
    if prediction == "x0":
        return pred
    raise ValueError(f"prediction {prediction!r} is not one of {', '.join(PREDICTIONS)}")


def posterior_sample(z: Tensor, x: Tensor, t: Tensor, s: Tensor, sched: CosineSchedule, noise: Tensor) -> Tensor:
    """z_s ~ q(z_s | z_t, x) for s < t, the posterior of the VP chain:
    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x,
    variance = sigma_{t|s}^2 sigma_s^2 / sigma_t^2. Differentiable in x (dualrate.distill draws its student's next
    state with it)."""
    a_t, s_t = sched.alpha_sigma(t)
    a_s, s_s = sched.alpha_sigma(s)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    coef_z = a_ts * s_s**2 / s_t**2
    coef_x = a_s * var_ts / s_t**2
    std = (var_ts * s_s**2 / s_t**2).clamp_min(0.0).sqrt()
    return _bc(coef_z, z) * z + _bc(coef_x, z) * x + _bc(std, z) * noise


def ancestral_step(z: Tensor, v: Tensor, t: Tensor, s: Tensor, sched: CosineSchedule, noise: Tensor,
                   prediction: str = "v") -> Tensor:
    """One DDPM step z_t -> z_s ~ q(z_s | z_t, x_hat) (posterior_sample, x_hat clamped to [-1, 1]) with s < t; at
    s == 0 it returns x_hat. `v` is the network's prediction of kind `prediction` (v, eps or x0)."""
    x_hat = x_from_prediction(z, v, t, sched, prediction).clamp(-1.0, 1.0)
    final = _bc((s <= 0).to(z.dtype), z)
    return final * x_hat + (1 - final) * posterior_sample(z, x_hat, t, s, sched, noise)


def step_times(steps: int) -> Tensor:
    """The N + 1 uniform times 1 = t_0 > t_1 > ... > t_N = 0 (float64 for exactness, cast by callers)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
