import math

import pytest
import torch

from dualrate.diffusion import (
    CosineSchedule,
    ancestral_step,
    eps_from_v,
    q_forward,
    q_sample,
    step_times,
    transition,
    v_target,
    x_from_v,
)

SCHED = CosineSchedule(-15.0, 15.0)


def test_schedule_end_points_and_variance_preserving():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a, s = SCHED.alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-12)
    assert SCHED.logsnr(torch.tensor([0.0], dtype=torch.float64)).item() == pytest.approx(15.0, abs=1e-9)
    assert SCHED.logsnr(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(-15.0, abs=1e-9)
    assert a[0] > 0.9999 and s[-1] > 0.9999  # data at t = 0, noise at t = 1
    assert (SCHED.logsnr(t).diff() < 0).all()  # log-SNR strictly decreasing


@pytest.mark.parametrize(("t", "tau"), [(0.1, 0.1), (0.2, 0.5), (0.05, 0.95), (0.7, 1.0)])
def test_forward_transition_composes_exactly(t, tau):
    """alpha_{tau|t} alpha_t = alpha_tau and sigma_{tau|t}^2 + alpha_{tau|t}^2 sigma_t^2 = sigma_tau^2."""
    tt, ttau = torch.tensor([t], dtype=torch.float64), torch.tensor([tau], dtype=torch.float64)
    a_ts, s_ts = transition(tt, ttau, SCHED)
    a_t, s_t = SCHED.alpha_sigma(tt)
    a_tau, s_tau = SCHED.alpha_sigma(ttau)
    assert torch.allclose(a_ts * a_t, a_tau, atol=1e-12)
    assert torch.allclose(s_ts**2 + a_ts**2 * s_t**2, s_tau**2, atol=1e-12)


def test_q_tau_given_t_composed_with_q_t_given_x_equals_q_tau_given_x_in_distribution():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.full((n, 1, 1, 1), 0.6, dtype=torch.float64)
    t, tau = torch.full((n,), 0.3, dtype=torch.float64), torch.full((n,), 0.65, dtype=torch.float64)
    z_t = q_sample(x, t, SCHED, torch.randn(x.shape, generator=g, dtype=torch.float64))
    z_tau = q_forward(z_t, t, tau, SCHED, torch.randn(x.shape, generator=g, dtype=torch.float64))
    a_tau, s_tau = SCHED.alpha_sigma(tau[:1])
    assert z_tau.mean().item() == pytest.approx(a_tau.item() * 0.6, abs=4 * s_tau.item() / math.sqrt(n))
    assert z_tau.std().item() == pytest.approx(s_tau.item(), rel=0.01)
    # Compared with direct draws from q(z_tau | x): same first two moments and quantiles.
    direct = q_sample(x, tau, SCHED, torch.randn(x.shape, generator=g, dtype=torch.float64))
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    assert torch.allclose(torch.quantile(z_tau.flatten(), qs), torch.quantile(direct.flatten(), qs), atol=0.01)


def test_v_x_eps_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    z = q_sample(x, t, SCHED, eps)
    v = v_target(x, eps, t, SCHED)
    assert torch.allclose(x_from_v(z, v, t, SCHED), x, atol=1e-10)
    assert torch.allclose(eps_from_v(z, v, t, SCHED), eps, atol=1e-10)


def test_ancestral_step_returns_x_hat_at_zero_and_posterior_mean_otherwise():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.full((4,), 0.25, dtype=torch.float64)
    z = q_sample(x, t, SCHED, eps)
    v = v_target(x, eps, t, SCHED)
    out = ancestral_step(z, v, t, torch.zeros(4, dtype=torch.float64), SCHED, torch.randn(x.shape, dtype=torch.float64))
    assert torch.allclose(out, x, atol=1e-9)
    # With zero noise, z_s is the posterior mean, which (for exact x) equals alpha_s x + sigma_s * (shrunk eps).
    s = torch.full((4,), 0.2, dtype=torch.float64)
    mean = ancestral_step(z, v, t, s, SCHED, torch.zeros_like(x))
    a_s, _ = SCHED.alpha_sigma(s[:1])
    assert (mean - a_s * x).abs().max() < (z - a_s * x).abs().max()


def test_step_times_uniform():
    ts = step_times(4)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
