"""MLP counterparts of the image networks, for 2-D toy mixtures (vectors of shape (B, D))."""

from __future__ import annotations

import torch
from torch import nn

from .unet import timestep_embedding


def mlp(d_in: int, hidden: int, depth: int, d_out: int) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class MLPDenoiser(nn.Module):
    """D(x_t, t) -> x0 for vectors; t enters as a sinusoidal embedding concatenated to the input."""

    def __init__(self, *, dim: int, hidden: int = 128, depth: int = 3, t_embed: int = 32):
        super().__init__()
        self.t_embed = t_embed
        self.net = mlp(dim + t_embed, hidden, depth, dim)

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, self.t_embed)], dim=1))


class MLPEnergy(nn.Module):
    def __init__(self, *, dim: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.net = mlp(dim, hidden, depth, 1)

    def forward(self, x):
        return self.net(x).squeeze(1)


class MLPGenerator(nn.Module):
    def __init__(self, *, dim: int, z_dim: int = 8, hidden: int = 128, depth: int = 3, out_scale: float = 2.0):
        super().__init__()
        self.z_dim, self.out_scale = z_dim, out_scale
        self.net = mlp(z_dim, hidden, depth, dim)

    def forward(self, z):
        return torch.tanh(self.net(z)) * self.out_scale
