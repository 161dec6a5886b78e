"""MLP counterparts of the image networks, for 2-D toy mixtures (vectors of shape (B, D))."""

from __future__ import annotations

import torch
from torch import nn

from .unet import timestep_embedding


def mlp(d_in: int, hidden: int, depth: int, d_out: int | None) -> nn.Sequential:
    """``depth`` SiLU hidden layers, then a linear output layer (none if ``d_out`` is None)."""
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    if d_out is not None:
        layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class MLPDenoiser(nn.Module):
    """D(x_t, t) -> x0 for vectors; t enters as a sinusoidal embedding concatenated to the input.

    With ``alpha_bar`` (the schedule's ᾱ_t table) the output is preconditioned as in EDM (Karras et al. 2022):
    D = c_skip·x_t + c_out·F(c_in·x_t, t). It still predicts x0, but near t = 0, where D must be almost the
    identity, the MLP only learns a small correction: without it a small MLP's x0 error at t ≈ 1 is larger than
    a toy mode's width, and every DDIM chain ends blurred.
    """

    def __init__(
        self,
        *,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        t_embed: int = 32,
        alpha_bar: torch.Tensor | None = None,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        self.t_embed, self.sigma_data = t_embed, sigma_data
        self.net = mlp(dim + t_embed, hidden, depth, dim)
        self.register_buffer("alpha_bar", None if alpha_bar is None else alpha_bar.float(), persistent=False)

    def forward(self, x, t):
        if self.alpha_bar is None:
            return self.net(torch.cat([x, timestep_embedding(t, self.t_embed)], dim=1))
        ab = self.alpha_bar[t.round().long()].unsqueeze(1)
        alpha, var, sd2 = ab.sqrt(), 1 - ab, self.sigma_data**2
        norm = alpha**2 * sd2 + var
        c_skip, c_out, c_in = alpha * sd2 / norm, (var * sd2 / norm).sqrt(), norm.rsqrt()
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, timestep_embedding(t, self.t_embed)], dim=1))


class MLPEnergy(nn.Module):
    """E(x) for vectors. With ``fourier_features`` > 0 the input is first mapped to [sin 2πBx, cos 2πBx] with a
    fixed B ~ N(0, fourier_scale²) (Tancik et al. 2020): a plain MLP learns the narrow bumps of a toy mixture's
    energy slowly (spectral bias), which only matters for EBMs without a generator to carry the detail."""

    def __init__(self, *, dim: int, hidden: int = 128, depth: int = 3, fourier_features: int = 0, fourier_scale=1.0):
        super().__init__()
        b = torch.randn(dim, fourier_features, generator=torch.Generator().manual_seed(0)) * fourier_scale
        self.register_buffer("fourier_b", b if fourier_features else None)
        self.body = mlp(2 * fourier_features if fourier_features else dim, hidden, depth, None)
        self.head = nn.Linear(hidden, 1)
        self.feature_dim = hidden

    def features(self, x):
        if self.fourier_b is not None:
            proj = 2 * torch.pi * x @ self.fourier_b
            x = torch.cat([proj.sin(), proj.cos()], dim=1)
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x)).squeeze(1)


class MLPGenerator(nn.Module):
    def __init__(self, *, dim: int, z_dim: int = 8, hidden: int = 128, depth: int = 3, out_scale: float = 2.0):
        super().__init__()
        self.z_dim, self.out_scale = z_dim, out_scale
        self.net = mlp(z_dim, hidden, depth, dim)

    def forward(self, z):
        return torch.tanh(self.net(z)) * self.out_scale
