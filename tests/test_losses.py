"""Improved CD's KL term: its gradient reaches θ only through the sampler, and the nearest-neighbour entropy
falls when samples collapse."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hdebm_ray.core.langevin import langevin_step_with_graph
from hdebm_ray.core.losses import kl_loss, nearest_neighbour_entropy


def test_nearest_neighbour_entropy_term_rises_when_samples_collapse():
    # Mode collapse: the new samples and the past samples in the buffer all sit near one point.
    g = torch.Generator().manual_seed(0)
    diverse_buffer, diverse = torch.randn(100, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    centre = torch.randn(1, 3, 8, 8, generator=g)
    collapsed_buffer = centre + 0.01 * torch.randn(100, 3, 8, 8, generator=g)
    collapsed = centre + 0.01 * torch.randn(64, 3, 8, 8, generator=g)
    term_diverse = -nearest_neighbour_entropy(diverse, diverse_buffer)  # the loss term, −H
    term_collapsed = -nearest_neighbour_entropy(collapsed, collapsed_buffer)
    assert term_collapsed > term_diverse + 4  # distances 100x smaller: log 100 = 4.6


def test_kl_gradient_reaches_theta_only_through_the_sampler():
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.SiLU(), nn.Linear(32, 1), nn.Flatten(0))
    frozen = copy.deepcopy(energy).requires_grad_(False)
    x = torch.randn(16, 3, 4, 4)
    x_hat = langevin_step_with_graph(energy, x, drift_coef=0.1, noise_std=0.01)
    loss, _ = kl_loss(frozen, x_hat, torch.randn(100, 3, 4, 4))
    loss.backward()
    assert all(p.grad is None for p in frozen.parameters())  # the scorer learns nothing
    # θ's weights shape ∇_x E, so they get gradient (the output bias does not, and rightly has none).
    first, last = energy[1], energy[3]
    assert first.weight.grad.abs().sum() > 0 and last.weight.grad.abs().sum() > 0

    # Without the graph through the step (a detached x̂), θ gets nothing: the gradient path is the sampler.
    energy.zero_grad(set_to_none=True)
    detached, _ = kl_loss(frozen, x_hat.detach().requires_grad_(True), torch.randn(100, 3, 4, 4))
    detached.backward()
    assert all(p.grad is None for p in energy.parameters())


def test_graph_step_matches_the_plain_update_numerically():
    torch.manual_seed(1)
    energy = nn.Sequential(nn.Flatten(), nn.Linear(12, 1), nn.Flatten(0))
    x = torch.randn(8, 3, 2, 2)
    x_req = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(energy(x_req).sum(), x_req)[0]
    assert torch.allclose(langevin_step_with_graph(energy, x, 0.3, 0.0), x - 0.3 * grad, atol=1e-6)
