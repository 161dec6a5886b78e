"""Optimisation helpers shared by every stage: Adam, LR schedules, layer-wise clipping and EMA in images."""

from __future__ import annotations

import math

import torch
from torch import nn


def layerwise_clip_(params, max_norm: float) -> torch.Tensor:
    """Clip each parameter tensor's gradient to ``max_norm`` separately (HDEBM D.3); returns the total norm.

    ``max_norm <= 0`` only measures. Norms and factors stay on the device (no host sync per parameter): a few
    foreach kernels, the result read only when the metrics are.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    if max_norm > 0:
        # factor 1 where the norm is within bounds: the same as clipping only the tensors over it
        factors = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, factors)
    return torch.linalg.vector_norm(torch.stack(norms))


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Factor on the base LR: linear warm-up from 0, then constant or cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return step / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def adam_with_schedule(
    params,
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 1,
    betas=(0.9, 0.999),
    kernels: dict | None = None,
):
    """Adam (``kernels``: ``Compute.adam_kwargs()``, fused / foreach) and its LambdaLR schedule."""
    opt = torch.optim.Adam(params, lr=lr, betas=betas, **(kernels or {}))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, warmup_steps, total_steps))


def load_adam_with_schedule(opt, sched, opt_state: dict, sched_state: dict) -> None:
    """Restore Adam and its schedule, keeping the learning rate they were built with: a checkpoint's state would
    put back its own (the divergence guard's backed-off LR, or a resumed run's new ``--set`` LR, would be lost)."""
    base_lrs = list(sched.base_lrs)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    sched.base_lrs = base_lrs
    for group, base, factor in zip(opt.param_groups, base_lrs, sched.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor(sched.last_epoch)


def ema_model(model: nn.Module, halflife_kimg: float, batch_size: int):
    """An EMA copy whose decay per step gives a half-life in images, so batch-size changes keep its meaning."""
    if halflife_kimg <= 0:
        return None
    beta = 0.5 ** (batch_size / (halflife_kimg * 1000))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(beta))
    ema.beta = beta
    return ema


@torch.no_grad()
def update_ema(ema, model: nn.Module) -> None:
    """``ema.update_parameters(model)`` without its host sync: AveragedModel reads its device-side counter
    ``n_averaged`` every update. The count is read once per process (or after a load) and then kept on the host;
    the update itself is the same: a copy on the first, ``ema ← β·ema + (1 − β)·θ`` after."""
    count = getattr(ema, "host_count", None)
    if count is None:
        count = int(ema.n_averaged)
    averaged, current = list(ema.module.parameters()), [p.detach() for p in model.parameters()]
    if count == 0:
        torch._foreach_copy_(averaged, current)
    else:
        torch._foreach_lerp_(averaged, current, 1.0 - ema.beta)
    ema.n_averaged += 1
    ema.host_count = count + 1


def load_ema(ema, state: dict) -> None:
    """Load an EMA's state_dict (the host copy of its count is read again at the next update)."""
    ema.load_state_dict(state)
    ema.host_count = None


class TrainedModule:
    """A network and everything that trains it: Adam with its LR schedule, fp16's loss scaler, the layer-wise
    gradient clip and the EMA in images. ``step(loss)`` is the update every stage makes; ``state_dict`` names the
    parts ``<name>``, ``<name>_opt``, ``<name>_sched``, ``<name>_scaler`` (fp16), ``<name>_ema`` (with an EMA).

    ``net`` is the plain module that is saved and averaged; a stage runs its forward passes through whatever wrapper
    it needs (DDP, autocast, compiled), which share its parameters.
    """

    def __init__(
        self,
        name: str,
        net: nn.Module,
        compute,
        *,
        lr: float,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 1,
        betas=(0.9, 0.999),
        grad_clip: float = 0.0,
        ema_halflife_kimg: float = 0.0,
        batch_size: int = 1,
    ):
        self.name, self.net, self.compute, self.grad_clip = name, net, compute, grad_clip
        self.schedule_args = (lr, schedule, warmup_steps, total_steps, tuple(betas))
        self.opt, self.sched = adam_with_schedule(
            net.parameters(), lr, schedule, warmup_steps, total_steps, tuple(betas), compute.adam_kwargs()
        )
        self.scaler = compute.scaler()
        self.ema = ema_model(net, ema_halflife_kimg, batch_size)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """One update on ``loss``: scaled backward, the true gradients clipped layer-wise, Adam, the schedule and
        the EMA; returns the gradient norm before clipping (on the device)."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradients (a no-op without fp16)
        grad_norm = layerwise_clip_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            update_ema(self.ema, self.net)
        return grad_norm

    def reset_optimizer(self) -> None:
        """A fresh Adam and schedule on the same parameters (a distillation student's next round)."""
        lr, schedule, warmup, total, betas = self.schedule_args
        self.opt, self.sched = adam_with_schedule(
            self.net.parameters(), lr, schedule, warmup, total, betas, self.compute.adam_kwargs()
        )

    def averaged(self) -> nn.Module:
        """The EMA weights' module (the network itself without an EMA)."""
        return self.ema.module if self.ema is not None else self.net

    def state_dict(self) -> dict[str, dict]:
        n = self.name
        states = {n: self.net.state_dict(), f"{n}_opt": self.opt.state_dict(), f"{n}_sched": self.sched.state_dict()}
        if self.ema is not None:
            states[f"{n}_ema"] = self.ema.state_dict()
        if self.scaler.is_enabled():  # fp16: a resume keeps the loss scale it had found
            states[f"{n}_scaler"] = self.scaler.state_dict()
        return states

    def load_state_dict(self, states: dict[str, dict]) -> None:
        """Restore every part the states hold (the learning rate stays the one this bundle was built with: a
        guard's back-off or a resumed run's new LR; ``load_adam_with_schedule``)."""
        n = self.name
        self.net.load_state_dict(states[n])
        if f"{n}_sched" in states:
            load_adam_with_schedule(self.opt, self.sched, states[f"{n}_opt"], states[f"{n}_sched"])
        else:  # written without a schedule (a constant LR): the optimiser alone, at this bundle's LR
            load_adam_with_schedule(self.opt, self.sched, states[f"{n}_opt"], self.sched.state_dict())
        if self.ema is not None and f"{n}_ema" in states:
            load_ema(self.ema, states[f"{n}_ema"])
        if self.scaler.is_enabled() and f"{n}_scaler" in states:
            self.scaler.load_state_dict(states[f"{n}_scaler"])
