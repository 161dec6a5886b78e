"""Stage "diffusion": train the truncated x0-predicting diffusion model D (docs/algorithms.md §3).

Its sampler shows what D does to data: a truncated diffusion cannot start from pure noise, so x ~ data is noised
to x_T' = α_T'·x + σ_T'·z and mapped back to x_0 by N0 DDIM steps — the "re-imagination" G2 performs inside HDEBM.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.diffusion import CosineSchedule, ddim_sample, diffusion_loss, noise_to_truncation
from ..core.optim import TrainedModule
from ..networks import build_denoiser
from .base import SamplerBase, StageBase


class TruncatedDiffusionSampler(SamplerBase):
    """x ~ data noised to T', then ``steps`` DDIM steps back to x_0 (N0 for the diffusion model itself)."""

    components = ("denoiser",)

    def __init__(self, cfg, states, device, location, step, protocol=None):
        super().__init__(cfg, states, device, location, step, protocol)
        self.schedule = CosineSchedule(cfg.diffusion.T, cfg.diffusion.cosine_s)
        self.denoiser = build_denoiser(cfg).to(device).eval()
        self.denoiser.load_state_dict(states["denoiser"])

    def ddim_steps(self) -> int:
        return self.cfg.distill.n0_steps

    def describe(self) -> str:
        steps = self.ddim_steps()
        return (
            f"dataset images noised to T'={self.cfg.diffusion.T_trunc}, then {steps} DDIM step{'s' * (steps > 1)}"
            " back (not from noise)"
        )

    @torch.no_grad()
    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, None]:
        t_trunc, x = self.cfg.diffusion.T_trunc, self.data(n, seed)
        g = torch.Generator(device=self.device).manual_seed(seed + 1)
        z = noise_to_truncation(self.schedule, x, torch.randn(x.shape, generator=g, device=self.device), t_trunc)
        return ddim_sample(self.denoiser, z, self.schedule, t_trunc, self.ddim_steps()).clamp(-1, 1), None


class DiffusionStage(StageBase):
    name = "diffusion"
    sampler = TruncatedDiffusionSampler
    in_pipeline = True
    reports = frozenset({"Loss/diffusion", "Opt/grad_norm", "Opt/lr"})

    @classmethod
    def networks(cls, cfg: Config):
        return {"denoiser": (lambda: build_denoiser(cfg), True)}

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        super().__init__(cfg, ctx, init_dir)
        d = self.s
        self.schedule = CosineSchedule(d.T, d.cosine_s)
        self.model = self.compute.layout(build_denoiser(cfg).to(ctx.device))
        self.ddp = self.compute.fast(ctx.wrap(self.model, "denoiser"))
        self.denoiser = TrainedModule(
            "denoiser",
            self.model,
            self.compute,
            lr=d.lr,
            schedule=d.lr_schedule,
            warmup_steps=d.warmup_steps,
            total_steps=d.steps,
            grad_clip=d.grad_clip,
        )
        self.batches = self.data_stream(seed_offset=0)

    def train_step(self, step: int) -> dict[str, float]:
        x0, _ = next(self.batches)
        d = self.cfg.diffusion
        loss = diffusion_loss(self.ddp, self.schedule, x0, d.T_trunc, d.loss_weighting)
        grad_norm = self.denoiser.step(loss)
        return {"Loss/diffusion": loss.detach(), "Opt/grad_norm": grad_norm, "Opt/lr": self.denoiser.lr}

    def state_dict(self) -> dict[str, dict]:
        return self.denoiser.state_dict()

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.denoiser.load_state_dict(states)
