"""Pieces the EBM stages share (HDEBM Stage 1/2 and the baselines): building H's trainer from a stage section,
the hat generator from a checkpoint, the per-rank data stream, toy2d tick metrics and fixed-start image grids."""

from __future__ import annotations

import torch

from ..checkpoint import load_states
from ..config import Config
from ..data import batch_stream, build_dataset, toy2d_centres
from ..diffusion import CosineSchedule
from ..ebm import EnergyTrainer, HatGenerator
from ..loop import WorkerContext
from ..networks import build_denoiser, build_energy, build_generator, latent_shape
from ..toy_metrics import mode_coverage

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
    )


def hat_generator(cfg: Config, ctx: WorkerContext, init_dir, with_g1: bool) -> HatGenerator:
    """G = G2∘G1 with D from ``init_dir`` (frozen) and G1 fresh, or G1 too from ``init_dir`` (Stage 2)."""
    names = ["denoiser", "generator"] if with_g1 else ["denoiser"]
    states = load_states(init_dir, names, map_location=ctx.device)
    denoiser = build_denoiser(cfg).to(ctx.device)
    denoiser.load_state_dict(states["denoiser"])
    g1 = build_generator(cfg).to(ctx.device)
    if with_g1:
        g1.load_state_dict(states["generator"])
    d = cfg.diffusion
    return HatGenerator(g1, denoiser.eval(), CosineSchedule(d.T, d.cosine_s), d.T_trunc)


def data_stream(cfg: Config, ctx: WorkerContext, batch_size: int, seed_offset: int):
    return batch_stream(
        build_dataset(cfg),
        batch_size // ctx.world_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.run.seed + seed_offset,
        num_workers=cfg.data.num_loader_workers,
        device=ctx.device,
    )


def latents(cfg: Config, n: int, image_shape, device, generator: torch.Generator | None = None):
    """Fresh z1 ~ N(0, I) of G1's latent shape and z2 ~ N(0, I) of the image's shape."""
    z1 = torch.randn(n, *latent_shape(cfg), device=device, generator=generator)
    z2 = torch.randn(n, *image_shape, device=device, generator=generator)
    return z1, z2


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
