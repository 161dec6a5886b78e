"""The energy update every EBM stage shares (HDEBM Stage 1/2 and the baselines): H, its DDP wrapper, Adam with
its LR schedule, layer-wise clipping, EMA, and the contrastive-divergence step.

Metrics come back as device tensors (the loop reads them once per report tick), so a step never syncs with the
host unless a feature needs a value on it (the MAD filter's order statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contracts import WorkerContext
from .compute import Compute, default_compute
from .losses import ebm_loss
from .optim import adam_with_schedule, ema_model, layerwise_clip_, load_adam_with_schedule, load_ema, update_ema
from .ranks import gather_across_ranks


class EnergyTrainer:
    """H, its DDP wrapper, Adam + LR schedule, layer-wise clipping and EMA; ``update`` is one θ step."""

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
        self.compute = compute = compute or default_compute(ctx.device)
        self.net = compute.layout(net.to(ctx.device))
        # ``fast``: H under autocast / compiled, for the chains (which run on it outside DDP); ``ddp``: the same
        # for the training forward. Both share ``net``'s parameters, the module that is saved and averaged.
        self.fast = compute.fast(self.net, chain=True)
        self.ddp = compute.fast(ctx.wrap(self.net, "energy"))
        self.opt, self.lr_sched = adam_with_schedule(
            self.net.parameters(), lr, schedule, warmup_steps, total_steps, betas, compute.adam_kwargs()
        )
        self.scaler = compute.scaler()
        self.ema = ema_model(self.net, ema_halflife_kimg, batch_size)
        self.grad_clip, self.temperature, self.data_jitter = grad_clip, temperature, data_jitter
        self.mad_k, self.energy_l2 = mad_k, energy_l2
        self.poisoned = False  # testing (guard.inject_nan_at_step): this step's energies are NaN

    def update(self, x_pos, x_neg, labelled=None, extra_loss=None) -> dict[str, float]:
        """One θ step on the CD loss (+ the energy L2 regulariser).

        ``labelled = (x, y, weight)`` adds M-JEM's weighted cross-entropy of the network's logits on x, from the
        same forward; ``extra_loss() -> (loss, metrics)`` adds a term computed outside DDP's forward (Improved
        CD's KL term, whose graph reaches θ through the sampler).
        """
        if self.data_jitter:
            x_pos = x_pos + self.data_jitter * torch.randn_like(x_pos)
        # One forward over every batch: DDP allows a single forward per backward.
        if labelled is None:
            energies, logits = self.ddp(torch.cat([x_pos, x_neg.detach()])), None
        else:
            energies, logits = self.ddp(torch.cat([x_pos, x_neg.detach(), labelled[0]]), with_logits=True)
        if self.poisoned:  # outside the compiled / DDP modules, whatever they return
            energies = energies * float("nan")
        n = len(x_pos)
        e_pos, e_neg = energies[:n], energies[n : 2 * n]
        # The MAD filter's median and MAD are over the global batch, not this rank's share of it.
        batch_e_pos = gather_across_ranks(e_pos) if self.mad_k else None
        loss, dropped = ebm_loss(e_pos, e_neg, self.temperature, self.mad_k, batch_e_pos)
        if self.energy_l2:  # M-EBM / Improved CD regulariser α (E(x⁺)² + E(x⁻)²)
            loss = loss + self.energy_l2 * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        extra_metrics = {}
        if labelled is not None:
            _, y, weight = labelled
            class_logits = logits[2 * n :]
            xent = F.cross_entropy(class_logits, y)
            loss = loss + weight * xent
            accuracy = (class_logits.argmax(1) == y).float().mean()
            extra_metrics = {"Loss/classifier": xent.detach(), "Classifier/train_accuracy": accuracy}
        if extra_loss is not None:
            term, more = extra_loss()
            loss = loss + term
            extra_metrics.update(more)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradients (a no-op without fp16)
        grad_norm = layerwise_clip_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        if self.ema is not None:
            update_ema(self.ema, self.net)
        e_pos, e_neg = e_pos.detach().mean(), e_neg.detach().mean()
        return {
            "Loss/energy": loss.detach(),
            "Energy/data": e_pos,
            "Energy/sample": e_neg,
            "Energy/gap": e_neg - e_pos,
            # 0 when H cannot tell samples from data: a per-step proxy for sample quality that Tune can minimise
            "Energy/abs_gap": abs(e_neg - e_pos),
            "Energy/mad_dropped": dropped,
            "Opt/lr_energy": self.opt.param_groups[0]["lr"],
            "Opt/grad_norm_energy": grad_norm,
            **extra_metrics,
        }

    def sampling_net(self, use_ema: bool = False) -> nn.Module:
        return self.ema.module if (use_ema and self.ema is not None) else self.net

    def state_dict(self, prefix: str = "energy") -> dict[str, dict]:
        states = {
            prefix: self.net.state_dict(),
            f"{prefix}_opt": self.opt.state_dict(),
            f"{prefix}_sched": self.lr_sched.state_dict(),
        }
        if self.ema is not None:
            states[f"{prefix}_ema"] = self.ema.state_dict()
        if self.scaler.is_enabled():  # fp16: a resume keeps the loss scale it had found
            states[f"{prefix}_scaler"] = self.scaler.state_dict()
        return states

    def load_state_dict(self, states: dict[str, dict], prefix: str = "energy") -> None:
        self.net.load_state_dict(states[prefix])
        load_adam_with_schedule(self.opt, self.lr_sched, states[f"{prefix}_opt"], states[f"{prefix}_sched"])
        if self.ema is not None and f"{prefix}_ema" in states:
            load_ema(self.ema, states[f"{prefix}_ema"])
        if self.scaler.is_enabled() and f"{prefix}_scaler" in states:
            self.scaler.load_state_dict(states[f"{prefix}_scaler"])
