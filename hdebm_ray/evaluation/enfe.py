"""Equivalent NFE (HDEBM appendix D.2.1, docs/algorithms.md §7): the cost of a stage's sampler in diffusion steps.

ENFE = 1000 · (mean time of one sampler batch) / (mean time of one 1000-step diffusion batch), both on batches of
32 with the checkpoint's own denoiser network as the diffusion model's network. A Stage 1 sampler with K Langevin
steps costs G(z) (one denoiser call) plus K energy forward/backward passes, so its ENFE says how many diffusion
steps the same wall time would buy. The baselines have no denoiser of their own: their ENFE is measured against
the denoiser of a ``reference`` checkpoint (any diffusion / HDEBM checkpoint of the same data shape).
"""

from __future__ import annotations

import time

import torch

from ..config import ConfigError
from ..core.diffusion import ddim_sample
from ..networks import sample_shape
from ..progress import progress as show_progress
from .sampling import Sampler


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_enfe(
    ckpt_dir,
    batches: int = 100,
    batch_size: int = 32,
    diffusion_batches: int | None = None,
    device="cpu",
    warmup: int = 1,
    diffusion_steps_timed: int | None = None,
    timer=None,
    reference=None,
    progress: bool = False,
) -> dict:
    """Time ``batches`` sampler batches and ``diffusion_batches`` (default: as many) 1000-step DDIM batches.

    ``diffusion_steps_timed`` (a divisor of 1000) times a DDIM chain of that many steps over the same range and
    scales it to 1000 steps: every step is one network call on the same batch, so the cost is linear in steps.
    ``timer(fn, device) -> cost`` measures one batch (default: wall seconds, CUDA synchronised). ``progress``:
    show progress over the timed batches (outside the timed calls).
    """

    sampler = Sampler(ckpt_dir, device=device, protocol="fresh")  # timing a sampler: chains, not a buffer
    dev, shape = sampler.device, sample_shape(sampler.cfg)
    diffusion = Sampler(reference, device=device, protocol="fresh") if reference else sampler
    if diffusion.denoiser is None:
        raise ConfigError(
            f"checkpoint {ckpt_dir} ({sampler.stage}) has no denoiser to time diffusion with: pass --reference DIR, "
            "a diffusion or HDEBM checkpoint of the same data"
        )
    if sample_shape(diffusion.cfg) != shape:
        raise ConfigError(f"--reference {reference} has samples of shape {sample_shape(diffusion.cfg)}, not {shape}")
    schedule, denoiser, steps = diffusion.schedule, diffusion.denoiser, diffusion.schedule.T
    timed = diffusion_steps_timed or steps
    if steps % timed:
        raise ConfigError(
            f"--diffusion-steps-timed {timed} must divide the reference diffusion's {steps} steps (e.g. "
            f"{', '.join(str(d) for d in range(1, min(steps, 100) + 1) if steps % d == 0 and d > 9)})"
        )

    def diffusion_batch(n_steps: int):
        with torch.no_grad():
            ddim_sample(denoiser, torch.randn(batch_size, *shape, device=dev), schedule, steps, n_steps)

    for i in range(warmup):
        sampler.sample(batch_size, seed=10_000 + i)
        diffusion_batch(min(timed, 10 if steps % 10 == 0 else timed))
    timer = timer or _timed
    sample_s = [
        timer(lambda i=i: sampler.sample(batch_size, seed=i), dev)
        for i in show_progress(range(batches), desc=f"enfe: {sampler.stage} sampler", unit="batches", enabled=progress)
    ]
    scale = steps / timed
    diffusion_range = show_progress(
        range(diffusion_batches or batches), desc=f"enfe: {timed}-step diffusion", unit="batches", enabled=progress
    )
    diffusion_s = [timer(lambda: diffusion_batch(timed), dev) * scale for _ in diffusion_range]
    mean_sample, mean_diffusion = sum(sample_s) / len(sample_s), sum(diffusion_s) / len(diffusion_s)
    return {
        "checkpoint": str(ckpt_dir),
        "stage": sampler.stage,
        "batch_size": batch_size,
        "batches": len(sample_s),
        "diffusion_batches": len(diffusion_s),
        "diffusion_steps": steps,
        "diffusion_steps_timed": timed,
        "sample_batch_s": mean_sample,
        "diffusion_batch_s": mean_diffusion,
        "enfe": steps * mean_sample / mean_diffusion,
        "device": str(dev),
    }
