"""Losses shared by the EBM algorithms: the contrastive-divergence EBM loss with the MAD filter, HDEBM's
generator regression onto banked Langevin samples, and Improved CD's KL term (docs/algorithms.md §1, §5, §8)."""

from __future__ import annotations

import torch


def mad_keep_mask(energies: torch.Tensor, k: float, batch_energies: torch.Tensor | None = None) -> torch.Tensor:
    """Keep data whose energy is not below median − k·MAD (HDEBM D.3.1); never applied to samples. The median
    and MAD are those of ``batch_energies`` (the global batch, when a batch is split over ranks), else of
    ``energies`` themselves."""
    stats_of = energies if batch_energies is None else batch_energies
    med = stats_of.median()
    mad = (stats_of - med).abs().median()
    return energies >= med - k * mad


def ebm_loss(
    e_pos: torch.Tensor,
    e_neg: torch.Tensor,
    temperature: float,
    mad_k: float | None = None,
    batch_e_pos: torch.Tensor | None = None,
):
    """mean U(x⁺) − mean U(x⁻) with U = H / T, optionally MAD-filtering the data against the statistics of
    ``batch_e_pos`` (every rank's data energies; default: this rank's); returns (loss, n_dropped)."""
    if not mad_k:
        return (e_pos.mean() - e_neg.mean()) / temperature, 0
    keep = mad_keep_mask(e_pos.detach(), mad_k, batch_e_pos)
    if batch_e_pos is None:
        data_term = e_pos[keep].mean()
    else:
        # The mean over the global batch's kept data: DDP averages the ranks' gradients, so each rank weights its
        # kept energies by world size / global kept count (a rank whose whole share is filtered adds 0, not NaN).
        kept = mad_keep_mask(batch_e_pos, mad_k, batch_e_pos).sum().clamp_min(1)
        data_term = e_pos[keep].sum() * (len(batch_e_pos) / len(e_pos)) / kept
    return (data_term - e_neg.mean()) / temperature, int((~keep).sum())


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


def nearest_neighbour_entropy(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The nearest-neighbour entropy estimate up to constants: mean log L2 distance from each sample to its nearest
    neighbour in ``reference`` (Improved CD: 100 past buffer samples). Larger when samples spread out."""
    distances = torch.cdist(samples.flatten(1), reference.flatten(1).detach())
    return torch.log(distances.min(dim=1).values + 1e-8).mean()


def kl_loss(frozen_energy, x_hat: torch.Tensor, reference: torch.Tensor | None, entropy_weight: float = 1.0):
    """Improved CD's L_KL = E_frozen(x̂⁻) − w·H_NN(x̂⁻); returns (L_KL, H_NN). ``x_hat`` carries the graph of the last
    Langevin step to θ, ``frozen_energy`` (E with no gradients to θ) only scores it, so θ learns through the
    sampler alone. Without a ``reference`` (a buffer too empty to measure against) the entropy term is left out
    and H_NN is None (not NaN: a NaN metric would read as a divergence)."""
    energy = frozen_energy(x_hat).mean()
    if reference is None:
        return energy, None
    entropy = nearest_neighbour_entropy(x_hat, reference)
    return energy - entropy_weight * entropy, entropy
