"""Langevin / SGLD samplers shared by HDEBM Stage 1, Stage 2 and the baselines (docs/algorithms.md §5, §6, §8).

One update rule serves all of them:

    x ← x − clip(c · ∇U(x)) + s · ξ,    ξ ~ N(0, I)

with the Hill convention c = ε²/2, s = ε (``hill_coefficients``) or the SGLD convention c = α, s = σ. ``clip``
bounds each sample's drift to an L2 norm (Hat EBM: 2.5); 0 turns it off. Samplers run on the bare network
(never through DDP) with its parameters frozen, so sampling neither syncs nor accumulates weight gradients.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Temporarily stop parameter gradients: Langevin only needs gradients with respect to its inputs."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():  # also inside callers' no_grad (e.g. clean-fid's generator hook)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def hill_coefficients(step_size: float, temperature: float = 1.0) -> tuple[float, float]:
    """(drift coefficient on ∇H, noise std) for U = H / T: c = ε² / (2T), s = ε."""
    return step_size**2 / (2 * temperature), step_size


class StepStats:
    """Running diagnostics of a chain: the mean per-sample drift norm before the clip, the fraction of clipped
    drifts, and the RMS per element of the drift actually taken (after the clip, and capped at the data range's
    width for a clamped chain; in data units: what the divergence guard bounds, whatever the energy's scale).

    Sums stay on the chain's device; nothing is read back until ``means()`` (the stage's metrics, which the loop
    reads once per report tick), so a chain step never waits for the host.
    """

    def __init__(self):
        self.drift_norm: torch.Tensor | float = 0.0
        self.clip_fraction: torch.Tensor | float = 0.0
        self.step_rms: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, norms: torch.Tensor, clipped: torch.Tensor | None, step_rms: torch.Tensor) -> None:
        self.drift_norm = self.drift_norm + norms.detach().mean()
        if clipped is not None:  # None: the chain does not clip
            self.clip_fraction = self.clip_fraction + clipped.float().mean()
        self.step_rms = self.step_rms + step_rms.detach().mean()
        self.count += 1

    def means(self) -> dict[str, torch.Tensor | float]:
        n = max(self.count, 1)
        return {
            "drift_norm": self.drift_norm / n,
            "clip_fraction": self.clip_fraction / n,
            "step_rms": self.step_rms / n,
        }


def langevin_update(
    x,
    grad,
    drift_coef: float,
    noise_std: float,
    drift_clip: float = 0.0,
    stats=None,
    grad_clamp: float = 0.0,
    range_width: float = 0.0,
):
    """One step x − clip(c·grad) + s·ξ; the clip bounds each sample's drift to L2 norm ``drift_clip``;
    ``grad_clamp`` first clamps each gradient element to [−grad_clamp, grad_clamp] (M-EBM's code: 1).
    ``range_width``: the chain is clamped to a range this wide after the step, so no element moves further; the
    step ``stats`` record is capped there (0: an unclamped chain)."""
    if grad_clamp > 0:
        grad = grad.clamp(-grad_clamp, grad_clamp)
    drift = drift_coef * grad
    if drift_clip > 0 or stats is not None:
        norms = torch.linalg.vector_norm(drift.flatten(1), dim=1)
    clipped = None
    if drift_clip > 0:
        clipped = norms > drift_clip
        # min(1, clip / ‖drift‖) per sample, without a data-dependent branch (no host sync)
        scale = (drift_clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        drift = drift * scale.reshape(-1, *([1] * (x.dim() - 1)))
    if stats is not None:
        if range_width > 0:
            taken_rms = drift.abs().clamp(max=range_width).flatten(1).square().mean(1).sqrt()
        else:
            taken = norms.clamp(max=drift_clip) if drift_clip > 0 else norms  # the drift after the clip
            taken_rms = taken / math.sqrt(x[0].numel())
        stats.add(norms, clipped, taken_rms)
    out = x - drift
    if noise_std > 0:
        out = out + noise_std * torch.randn_like(x)
    return out


def energy_grad(energy_fn, x: torch.Tensor) -> torch.Tensor:
    """∇_x Σ_b energy(x_b), without building a graph to keep."""
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(energy_fn(x).sum(), x)[0]


def sample_langevin(
    energy_fn,
    x0,
    steps: int,
    drift_coef: float,
    noise_std: float,
    drift_clip: float = 0.0,
    stats=None,
    bounds: tuple[float, float] | None = None,
    grad_clamp: float = 0.0,
):
    """``steps`` updates of ``langevin_update`` from x0 on the energy ``energy_fn`` (already divided by T);
    ``bounds`` clamps the chain after every step (M-EBM and Improved CD keep their chains in the data range)."""
    x = x0.detach()
    for _ in range(steps):
        grad = energy_grad(energy_fn, x)
        width = bounds[1] - bounds[0] if bounds is not None else 0.0
        x = langevin_update(x, grad, drift_coef, noise_std, drift_clip, stats, grad_clamp, width).detach()
        if bounds is not None:
            x = x.clamp(*bounds)
    return x


def langevin_step_with_graph(energy: nn.Module, x: torch.Tensor, drift_coef: float, noise_std: float):
    """One update x − c·∇E_θ(x) + s·ξ that keeps the graph to θ (Improved CD's x̂⁻): the drift is
    differentiated with ``create_graph``, so a loss on the result reaches θ through the sampler."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        grad = torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]
    out = x.detach() - drift_coef * grad
    return out + noise_std * torch.randn_like(out) if noise_std > 0 else out


def sample_residual(
    energy: nn.Module,
    x_base: torch.Tensor,
    steps: int,
    step_size: float,
    temperature: float,
    drift_clip: float,
    stats=None,
):
    """HDEBM Stage 1 (Eq. 12): Langevin on Y with X = x_base + Y, Y_0 = 0, latents (hence x_base) fixed."""
    c, s = hill_coefficients(step_size, temperature)
    x_base = x_base.detach()
    with frozen(energy):
        return sample_langevin(lambda y: energy(x_base + y), torch.zeros_like(x_base), steps, c, s, drift_clip, stats)


def sample_joint(
    energy: nn.Module,
    generator,
    z1,
    z2,
    *,
    steps: int,
    y_step_size: float,
    z1_step_size: float,
    z2_step_size: float,
    temperature: float,
    drift_clip: float,
    y_steps_per_latent_step: int = 5,
    latent_prior: bool = False,
    stats=None,
    modules: tuple[nn.Module, ...] = (),
):
    """HDEBM Stage 2 (Eq. 13–15): Langevin on (Y, z1, z2) for U(G(z1, z2) + Y); returns (Y, z1, z2, G(z1, z2)).

    Every step moves Y against G at the current latents (Eq. 13). Every ``y_steps_per_latent_step``-th step then
    moves the latents too, with their gradients taken through G at the NEW residual, G(z1_k, z2_k) + Y_{k+1}
    (Eq. 14–15), and G is re-evaluated at the new latents. Only Y's drift is clipped, as in Hat EBM.
    ``latent_prior`` adds the N(0, I) prior, U = H/T + ‖z‖²/2, whose gradient is not divided by T.
    """
    cy, sy = hill_coefficients(y_step_size, temperature)
    c1, s1 = hill_coefficients(z1_step_size, temperature)
    c2, s2 = hill_coefficients(z2_step_size, temperature)
    prior = temperature if latent_prior else 0.0  # c·(T·z) = (ε²/2)·z
    with frozen(energy, *modules):
        z1, z2 = z1.detach(), z2.detach()
        with torch.no_grad():
            x_gen = generator(z1, z2)
        y = torch.zeros_like(x_gen)
        for k in range(steps):
            y = langevin_update(y, energy_grad(lambda v, b=x_gen: energy(b + v), y), cy, sy, drift_clip, stats)
            y = y.detach()
            if k % y_steps_per_latent_step == 0:
                z1.requires_grad_(True)
                z2.requires_grad_(True)
                g_z1, g_z2 = torch.autograd.grad(
                    energy(generator(z1, z2) + y).sum(), (z1, z2), allow_unused=True, materialize_grads=True
                )
                z1 = langevin_update(z1, g_z1 + prior * z1, c1, s1).detach()
                z2 = langevin_update(z2, g_z2 + prior * z2, c2, s2).detach()
                with torch.no_grad():
                    x_gen = generator(z1, z2)
    return y, z1, z2, x_gen
