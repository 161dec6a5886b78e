"""Langevin against closed forms (docs/algorithms.md §10): exact discretised stationary moments, the drift clip, and
Stage 2's latent steps reaching z through G."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hdebm_ray.core.diffusion import CosineSchedule
from hdebm_ray.core.hat import HatGenerator
from hdebm_ray.core.langevin import (
    StepStats,
    hill_coefficients,
    langevin_update,
    sample_joint,
    sample_langevin,
    sample_residual,
)

N_CHAINS = 20000


def gaussian_energy(mu: float, sigma: float):
    return lambda x: ((x - mu) ** 2).sum(dim=1) / (2 * sigma**2)


def _check_moments(x: torch.Tensor, mean: float, var: float):
    n = x.numel()
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
    assert abs(x.mean().item() - mean) < 4 * se_mean, (x.mean().item(), mean)
    assert abs(x.var().item() - var) < 4 * se_var, (x.var().item(), var)


def test_hill_langevin_on_gaussian_has_exact_discretised_variance():
    torch.manual_seed(0)
    mu, sigma, eps = 0.7, 1.0, 1.0
    c, s = hill_coefficients(eps)  # c = ε²/2, s = ε
    x = sample_langevin(gaussian_energy(mu, sigma), torch.zeros(N_CHAINS, 1), 60, c, s)
    exact = sigma**2 / (1 - eps**2 / (4 * sigma**2))  # 4/3, not σ² = 1
    _check_moments(x, mu, exact)
    # A 10% error in the noise scale moves the variance by 21%: far outside the 4-SE band used above.
    assert abs(1.1**2 * exact - exact) > 4 * exact * math.sqrt(2 / N_CHAINS) * 4


def test_sgld_form_on_gaussian_has_ar1_variance():
    torch.manual_seed(1)
    mu, sigma, alpha, noise = -0.3, 1.0, 0.3, 0.5
    a = 1 - alpha / sigma**2
    x = sample_langevin(gaussian_energy(mu, sigma), torch.zeros(N_CHAINS, 1), 80, alpha, noise)
    _check_moments(x, mu, noise**2 / (1 - a**2))


def test_temperature_scales_the_drift_only():
    c, s = hill_coefficients(1e-3, temperature=1e-6)
    assert math.isclose(c, 1e-6 / 2 / 1e-6) and s == 1e-3


def test_drift_clip_bounds_every_sample_step():
    torch.manual_seed(2)
    x = torch.randn(500, 3, 4, 4)
    grad = torch.randn_like(x) * torch.logspace(-3, 3, 500).reshape(-1, 1, 1, 1)
    out = langevin_update(x, grad, drift_coef=1.0, noise_std=0.0, drift_clip=0.5)
    steps = (out - x).flatten(1).norm(dim=1)
    assert steps.max() <= 0.5 + 1e-5
    small = grad.flatten(1).norm(dim=1) < 0.5
    assert small.any() and (~small).any()
    assert torch.allclose(steps[small], grad.flatten(1).norm(dim=1)[small], rtol=1e-5)  # unclipped: unchanged
    assert torch.allclose(steps[~small], torch.full_like(steps[~small], 0.5), rtol=1e-5)


def test_step_rms_is_the_step_taken_clipped_and_capped_at_a_clamped_chains_range():
    """What the guard bounds: the per-element RMS of the drift after the clip (whatever the energy's scale), and for
    a chain clamped to [-1, 1] never more than the range's width (it cannot move further)."""
    torch.manual_seed(3)
    x = torch.rand(8, 3, 4, 4) * 2 - 1
    huge = lambda y: 1e6 * y.sum(dim=(1, 2, 3))  # noqa: E731 - a gradient of 1e6 in every element
    clipped, clamped, free = StepStats(), StepStats(), StepStats()
    sample_langevin(huge, x, 1, 1.0, 0.0, drift_clip=0.5, stats=clipped)
    sample_langevin(huge, x, 1, 1.0, 0.0, stats=clamped, bounds=(-1.0, 1.0))
    sample_langevin(huge, x, 1, 1.0, 0.0, stats=free)
    assert float(clipped.means()["step_rms"]) == pytest.approx(0.5 / math.sqrt(48), rel=1e-5)
    assert float(clamped.means()["step_rms"]) == pytest.approx(2.0)
    assert float(free.means()["step_rms"]) == pytest.approx(1e6)


def test_residual_sampler_moves_y_only_and_starts_at_zero():
    torch.manual_seed(3)
    energy = nn.Sequential(nn.Flatten(), nn.Linear(8, 1), nn.Flatten(0))
    base = torch.randn(16, 8)
    y = sample_residual(energy, base, steps=1, step_size=1e-2, temperature=1e-4, drift_clip=0.0)
    grad = energy[1].weight.detach().reshape(1, 8)  # linear energy: constant gradient
    c, s = hill_coefficients(1e-2, 1e-4)
    assert torch.allclose(y.mean(0), -c * grad[0], atol=4 * s / 4)
    assert all(p.requires_grad for p in energy.parameters())  # parameters unfrozen afterwards


class _Toy(nn.Module):
    def __init__(self, d_in, d_out, use_input=True):
        super().__init__()
        self.lin, self.use_input = nn.Linear(d_in, d_out), use_input

    def forward(self, x, t=None):
        return self.lin(x if self.use_input else torch.zeros_like(x))


def test_stage2_latent_steps_change_z_through_the_generator():
    torch.manual_seed(4)
    energy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0))
    kwargs = dict(
        steps=10,
        y_step_size=1e-3,
        z1_step_size=1e-3,
        z2_step_size=1e-3,
        temperature=1e-8,
        drift_clip=0.0,
        y_steps_per_latent_step=5,
    )
    moves = {}
    for use_z1 in (True, False):
        hat = HatGenerator(_Toy(3, 4, use_input=use_z1), _Toy(4, 4), CosineSchedule(1000), 100)
        z1, z2 = torch.randn(64, 3), torch.randn(64, 4)
        y, z1_k, z2_k, x_gen = sample_joint(energy, hat, z1.clone(), z2.clone(), modules=(hat,), **kwargs)
        moves[use_z1] = ((z1_k - z1).norm(dim=1).mean().item(), (z2_k - z2).norm(dim=1).mean().item())
        assert torch.allclose(x_gen, hat(z1_k, z2_k).detach(), atol=1e-6)  # X⁻ uses the final latents
    noise_only = 2 * 1e-3 * math.sqrt(3)  # two latent steps of pure noise
    assert moves[True][0] > 20 * noise_only  # z1 moved by the energy's gradient through G1 and G2
    assert moves[False][0] < 3 * noise_only  # with G1 ignoring z1, only the noise moves it
    assert moves[True][1] > 20 * noise_only and moves[False][1] > 20 * noise_only  # z2 reaches G2 either way
