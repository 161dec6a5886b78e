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
