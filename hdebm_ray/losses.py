"""Losses shared by the EBM algorithms: the contrastive-divergence EBM loss with the MAD filter, and HDEBM's
generator regression onto banked Langevin samples (ALGORITHMS §1, §5)."""

from __future__ import annotations

import torch


def mad_keep_mask(energies: torch.Tensor, k: float) -> torch.Tensor:
    """Keep data whose energy is not below median − k·MAD (HDEBM D.3.1); never applied to samples."""
    med = energies.median()
    mad = (energies - med).abs().median()
    return energies >= med - k * mad


def ebm_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, temperature: float, mad_k: float | None = None):
    """mean U(x⁺) − mean U(x⁻) with U = H / T, optionally MAD-filtering the data; returns (loss, n_dropped)."""
    keep = mad_keep_mask(e_pos.detach(), mad_k) if mad_k else torch.ones_like(e_pos, dtype=torch.bool)
    loss = (e_pos[keep].mean() - e_neg.mean()) / temperature
    return loss, int((~keep).sum())


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    if mask is None:
        return per_sample.mean()
    mask = mask.to(per_sample.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)


def generator_loss(x_full, x_raw, target, beta1: float, beta2: float, scale: float = 1.0, mask=None):
    """scale · (β1·‖G2(G1(z1), z2) − X⁻‖² + β2·‖G1(z1) − X⁻‖²), pixel means, over banked (z1, z2, X⁻)."""
    loss = beta1 * masked_mse(x_full, target, mask)
    if beta2:
        loss = loss + beta2 * masked_mse(x_raw, target, mask)
    return scale * loss
