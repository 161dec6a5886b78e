"""Pieces every EBM stage shares (HDEBM Stage 1/2 and the baselines): H's trainer built from a stage section,
toy2d tick metrics and fixed-start image grids."""

from __future__ import annotations

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.energy_trainer import EnergyTrainer
from ..core.ranks import status
from ..core.toy_metrics import mode_coverage
from ..data.datasets import toy2d_centres
from ..networks import build_energy

TOY_EVAL_SAMPLES = 1000


def energy_trainer(
    cfg: Config,
    ctx: WorkerContext,
    section,
    lr: float,
    temperature: float,
    energy_l2: float = 0.0,
    num_classes: int = 0,
    betas=(0.9, 0.999),
    multiscale: bool = False,
    compute=None,
) -> EnergyTrainer:
    """H's trainer from a stage section's optimiser, schedule, clipping, jitter, MAD and EMA settings."""
    return EnergyTrainer(
        build_energy(cfg, num_classes, multiscale),
        ctx,
        lr=lr,
        schedule=section.lr_schedule,
        warmup_steps=section.warmup_steps,
        total_steps=section.steps,
        grad_clip=section.grad_clip,
        temperature=temperature,
        data_jitter=section.data_jitter,
        mad_k=section.mad_k if section.mad_filter else None,
        ema_halflife_kimg=section.ema_halflife_kimg,
        batch_size=section.batch_size,
        energy_l2=energy_l2,
        betas=tuple(betas),
        compute=compute,
    )


def restore_snapshot(stage, start_step: int, noun: str, refill: str) -> int | None:
    """Rank 0 of a resumed stage: load the ``stage.bank`` snapshot of the checkpoint Ray restored (which need not
    be the newest), or the newest usable older one; record it in the summary (``<noun>_restores``) and say when it
    is not the checkpoint's own. Returns the loaded step; None when none is usable (the caller does ``refill``)."""
    loaded = stage.bank.restore(start_step)
    restores = stage.summary_state.setdefault(f"{noun}_restores", [])
    restores.append({"checkpoint_step": start_step, f"{noun}_step": loaded})
    if loaded is None:
        status(f"[{stage.name}] no usable {noun} snapshot for step {start_step}; {refill}")
    elif loaded != start_step:
        status(f"[{stage.name}] resuming at step {start_step} with the {noun} of step {loaded}")
    return loaded


def toy2d_tick_metrics(cfg: Config, ctx: WorkerContext, sample) -> dict[str, float]:
    """On toy2d, rank 0 scores ``sample(n)`` by mode coverage every report tick (the metric Tune sweeps on).

    Fixed latents and noise, drawn under a forked RNG: the training noise of later steps stays the same whether
    or not this runs.
    """
    if cfg.data.dataset != "toy2d" or not ctx.is_chief:
        return {}
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 12345)
        x = sample(TOY_EVAL_SAMPLES)
    m = mode_coverage(x.detach().cpu(), toy2d_centres(cfg.data.toy2d_mixture), cfg.data.toy2d_std)
    return {"Eval/toy2d_modes": float(m["modes_covered"]), "Eval/toy2d_quality": m["high_quality_fraction"]}


def fixed_sample_grids(cfg: Config, ctx: WorkerContext, sample, start_tag: str) -> dict[str, torch.Tensor]:
    """Rank 0's TensorBoard grids at a checkpoint, from the same chain starts and Langevin noise every time, so
    frames compare over training: the chain starts (``start_tag``), the final samples, and the final samples of
    the EMA weights.

    ``sample(n, generator, use_ema) -> (starts, final)`` draws its chain starts from ``generator``; runs under a
    forked RNG (training noise is unchanged).
    """
    n = cfg.eval.image_grid
    if n == 0 or not ctx.is_chief:
        return {}

    def fixed(use_ema: bool):
        torch.manual_seed(cfg.run.seed + 4243)
        return sample(n, torch.Generator(device=ctx.device).manual_seed(cfg.run.seed + 4242), use_ema)

    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        starts, final = fixed(False)
        _, final_ema = fixed(True)
    return {start_tag: starts, "Samples/final": final, "Samples/ema": final_ema}
