"""The energy update every EBM stage shares (HDEBM Stage 1/2 and the baselines): H trained as a ``TrainedModule``
(Adam, schedule, clip, EMA), its DDP wrapper, and the contrastive-divergence step, with room for one more loss term
(``ExtraTerm``: M-JEM's cross-entropy, Improved CD's KL term).

Metrics come back as device tensors (the loop reads them once per report tick), so a step never syncs with the
host unless a feature needs a value on it (the MAD filter's order statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..contracts import WorkerContext
from .compute import Compute, default_compute
from .losses import ebm_loss
from .optim import TrainedModule
from .ranks import gather_across_ranks


@dataclass(frozen=True)
class ExtraTerm:
    """A loss term beside CD. ``loss(outputs)`` returns (the term, its metrics); ``inputs`` join the energy forward
    (DDP allows one forward per backward), and ``outputs`` are the network's logits on them (M-JEM's classifier
    head); without inputs, ``outputs`` is None and the term is computed outside that forward (Improved CD's KL term,
    whose graph reaches θ through the sampler)."""

    loss: Callable[[torch.Tensor | None], tuple[torch.Tensor, dict]]
    inputs: torch.Tensor | None = None


class EnergyTrainer:
    """H as a ``TrainedModule`` named ``energy``, with its DDP wrapper; ``update`` is one θ step."""

    def __init__(
        self,
        net: nn.Module,
        ctx: WorkerContext,
        *,
        lr: float,
        schedule: str,
        warmup_steps: int,
        total_steps: int,
        grad_clip: float,
        temperature: float,
        data_jitter: float,
        mad_k: float | None,
        ema_halflife_kimg: float,
        batch_size: int,
        betas=(0.9, 0.999),
        energy_l2: float = 0.0,
        compute: Compute | None = None,
    ):
        compute = compute or default_compute(ctx.device)
        net = compute.layout(net.to(ctx.device))
        self.trained = TrainedModule(
            "energy",
            net,
            compute,
            lr=lr,
            schedule=schedule,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            betas=betas,
            grad_clip=grad_clip,
            ema_halflife_kimg=ema_halflife_kimg,
            batch_size=batch_size,
        )
        # ``fast``: H under autocast / compiled, for the chains (which run on it outside DDP); ``ddp``: the same
        # for the training forward. Both share ``net``'s parameters, the module that is saved and averaged.
        self.fast = compute.fast(net, chain=True)
        self.ddp = compute.fast(ctx.wrap(net, "energy"))
        self.temperature, self.data_jitter = temperature, data_jitter
        self.mad_k, self.energy_l2 = mad_k, energy_l2

    @property
    def net(self) -> nn.Module:
        return self.trained.net

    @property
    def ema(self):
        return self.trained.ema

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.trained.scaler

    def update(self, x_pos, x_neg, extra: ExtraTerm | None = None) -> dict[str, torch.Tensor]:
        """One θ step on the CD loss (+ the energy L2 regulariser, + ``extra``'s term)."""
        if self.data_jitter:
            x_pos = x_pos + self.data_jitter * torch.randn_like(x_pos)
        # One forward over every batch: DDP allows a single forward per backward.
        outputs = None
        if extra is None or extra.inputs is None:
            energies = self.ddp(torch.cat([x_pos, x_neg.detach()]))
        else:
            energies, logits = self.ddp(torch.cat([x_pos, x_neg.detach(), extra.inputs]), with_logits=True)
            outputs = logits[2 * len(x_pos) :]
        n = len(x_pos)
        e_pos, e_neg = energies[:n], energies[n : 2 * n]
        # The MAD filter's median and MAD are over the global batch, not this rank's share of it.
        batch_e_pos = gather_across_ranks(e_pos) if self.mad_k else None
        loss, dropped = ebm_loss(e_pos, e_neg, self.temperature, self.mad_k, batch_e_pos)
        if self.energy_l2:  # M-EBM / Improved CD regulariser α (E(x⁺)² + E(x⁻)²)
            loss = loss + self.energy_l2 * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        extra_metrics = {}
        if extra is not None:
            term, extra_metrics = extra.loss(outputs)
            loss = loss + term
        grad_norm = self.trained.step(loss)
        e_pos, e_neg = e_pos.detach().mean(), e_neg.detach().mean()
        return {
            "Loss/energy": loss.detach(),
            "Energy/data": e_pos,
            "Energy/sample": e_neg,
            "Energy/gap": e_neg - e_pos,
            # 0 when H cannot tell samples from data: a per-step proxy for sample quality that Tune can minimise
            "Energy/abs_gap": abs(e_neg - e_pos),
            "Energy/mad_dropped": dropped,
            "Opt/lr_energy": self.trained.lr,
            "Opt/grad_norm_energy": grad_norm,
            # the chain ends' magnitude in data units: an exploding chain leaves the data's range whatever H's scale
            "Langevin/sample_abs_max": x_neg.detach().abs().amax(),
            **extra_metrics,
        }

    def sampling_net(self, use_ema: bool = False) -> nn.Module:
        return self.trained.averaged() if use_ema else self.net

    def state_dict(self) -> dict[str, dict]:
        return self.trained.state_dict()

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.trained.load_state_dict(states)
