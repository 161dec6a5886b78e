"""What HDEBM's two stages and their samplers share: the hat generator G = G2∘G1 built from a checkpoint, fresh
latents, and the sampler base that loads G and H from a Stage 1 / Stage 2 checkpoint."""

from __future__ import annotations

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.diffusion import CosineSchedule
from ..core.hat import HatGenerator
from ..io.checkpoint import load_states
from ..networks import build_denoiser, build_energy, build_generator, latent_shape, sample_shape
from .base import SamplerBase


def build_hat(cfg: Config, states: dict[str, dict], device) -> HatGenerator:
    """G = G2∘G1 from state_dicts: ``denoiser`` (frozen, eval mode) and, if given, ``generator`` (else fresh G1)."""
    denoiser = build_denoiser(cfg).to(device)
    denoiser.load_state_dict(states["denoiser"])
    g1 = build_generator(cfg).to(device)
    if "generator" in states:
        g1.load_state_dict(states["generator"])
    d = cfg.diffusion
    return HatGenerator(g1, denoiser.eval(), CosineSchedule(d.T, d.cosine_s), d.T_trunc)


def hat_generator(cfg: Config, ctx: WorkerContext, init_dir, g1_state: dict | None = None) -> HatGenerator:
    """G = G2∘G1 with D from ``init_dir`` (frozen) and G1 fresh (Stage 1), or with ``g1_state`` (Stage 2)."""
    states = load_states(init_dir, ["denoiser"], map_location=ctx.device)
    if g1_state is not None:
        states["generator"] = g1_state
    return build_hat(cfg, states, ctx.device)


def fast_hat(compute, hat: HatGenerator, chain: bool = False) -> HatGenerator:
    """``hat`` with G1 and the denoiser behind ``compute.fast`` (autocast / compiled), sharing their parameters;
    ``chain``: a Langevin chain differentiates through it (Stage 2's latent steps)."""
    compute.layout(hat)
    fast = [compute.fast(m, chain=chain) for m in (hat.g1, hat.denoiser)]
    return HatGenerator(*fast, hat.schedule, hat.t_trunc)


def latents(cfg: Config, n: int, image_shape, device, generator: torch.Generator | None = None):
    """Fresh z1 ~ N(0, I) of G1's latent shape and z2 ~ N(0, I) of the image's shape."""
    z1 = torch.randn(n, *latent_shape(cfg), device=device, generator=generator)
    z2 = torch.randn(n, *image_shape, device=device, generator=generator)
    return z1, z2


class HatSampler(SamplerBase):
    """Samples of a Stage 1 / Stage 2 checkpoint: X = G(z1, z2) + Y after that stage's Langevin chain."""

    components = ("denoiser", "generator", "energy")
    start_name = "generator"  # results name the chain start G(z) alone "generator"

    def __init__(self, cfg, states, device, location, step, protocol=None):
        super().__init__(cfg, states, device, location, step, protocol)
        self.hat = build_hat(cfg, states, device).eval()
        self.denoiser, self.schedule = self.hat.denoiser, self.hat.schedule
        self.energy = build_energy(cfg).to(device).eval()
        self.energy.load_state_dict(states["energy"])

    def latents(self, n: int, seed: int):
        g = torch.Generator(device=self.device).manual_seed(seed)
        return latents(self.cfg, n, sample_shape(self.cfg), self.device, g)
