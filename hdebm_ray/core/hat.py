"""HDEBM's hat generator G = G2∘G1 (docs/algorithms.md §5): a trained G1 followed by the frozen one-step
denoiser G2 that "re-imagines" G1's output from the truncation time T'."""

from __future__ import annotations

import torch
from torch import nn

from .diffusion import CosineSchedule, one_step_denoise


class HatGenerator(nn.Module):
    """G(z1, z2) = G2(G1(z1), z2), G2(x, z2) = D(α_T'·x + σ_T'·z2, T') with D the frozen one-step denoiser."""

    def __init__(self, g1: nn.Module, denoiser: nn.Module, schedule: CosineSchedule, t_trunc: int):
        super().__init__()
        self.g1, self.denoiser = g1, denoiser.requires_grad_(False)
        self.schedule, self.t_trunc = schedule, t_trunc

    def train(self, mode: bool = True) -> HatGenerator:
        """G1 follows ``mode``; G2's denoiser is a fixed function and stays in eval mode (no dropout)."""
        super().train(mode)
        self.denoiser.eval()
        return self

    def g2(self, x: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return one_step_denoise(self.denoiser, self.schedule, x, z2, self.t_trunc)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.g2(self.g1(z1), z2)
