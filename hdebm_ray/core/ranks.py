"""Where a process stands among the DDP ranks, and what the ranks do together: the bare module behind DDP, means,
gathers and barriers across ranks (one process: no-ops), per-rank seeding, the replica check, and the status line.
Pure torch: the stages, the energy trainer and the step loop use them alike."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module behind a DDP wrapper (Langevin and sampling run on it, not through DDP)."""
    return model.module if hasattr(model, "module") else model


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(value: float) -> float:
    if distributed():
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()
    return value


def seed_steps(seed: int, rank: int, start_step: int, attempt: int = 0) -> None:
    """Different noise per rank, and a restart does not replay the noise of the steps it redoes; ``attempt``
    (the guard's rollbacks so far) gives a rolled-back stretch new noise too."""
    torch.manual_seed(seed * 100003 + rank * 7919 + start_step + attempt * 15485863)


def status(line: str) -> None:
    """One status line on stdout. Not ``print``: Ray Train patches print in workers to log *and* echo, which
    shows every line twice in the driver's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def gather_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each, detached), concatenated in rank order; ``t`` itself in one process."""
    if not distributed():
        return t.detach()
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def barrier() -> None:
    if distributed():
        dist.barrier()


def check_replicas_agree(module: nn.Module, what: str) -> None:
    """Raise if the DDP ranks' copies of ``module`` differ: a gradient that bypassed DDP's all-reduce (e.g. one
    reaching θ through a sampler rather than DDP's forward) would let them drift apart silently."""
    if not distributed():
        return
    with torch.no_grad():
        local = torch.stack([p.double().sum() for p in module.parameters()]).sum().reshape(1)
        local = torch.cat([local, torch.stack([p.double().abs().sum() for p in module.parameters()]).sum().reshape(1)])
    if dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    if spread > 1e-6 * (1 + gathered[0].abs().max().item()):
        raise RuntimeError(
            f"the ranks' copies of {what} differ (checksum spread {spread:.3g}): DDP did not sync a gradient"
        )
