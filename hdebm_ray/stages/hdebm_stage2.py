"""Stage "stage2": HDEBM Algorithm 2 — only H is trained; joint Langevin on (Y, z1, z2) (docs/algorithms.md §6).

Starts from Stage 1's H and frozen G = G2∘G1. Chains start from Y_0 = 0 and fresh latents; no bank.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.langevin import StepStats, sample_joint
from ..io.checkpoint import ema_weights, load_config_of, load_meta, load_states
from ..networks import build_denoiser, build_energy, build_generator, sample_shape
from .base import Backoff, StageBase
from .ebm_common import energy_trainer, fixed_sample_grids, toy2d_tick_metrics
from .hdebm_common import HatSampler, fast_hat, hat_generator, latents
from .reported import ENERGY


def joint_sampler_kwargs(cfg: Config) -> dict:
    """``core.langevin.sample_joint``'s chain settings, from ``stage2.langevin``."""
    return dataclasses.asdict(cfg.stage2.langevin)


def follow_stage1_chain(cfg: Config, init_dir, step_sizes: tuple[str, ...]) -> tuple[Config, str | None]:
    """``cfg`` with Stage 2's chain step sizes (``step_sizes``, keys of its section) scaled to the chain Stage 1's H
    was trained with, and a status line (``cfg`` and None where the scale is 1 or ``stage2.follow_stage1_step_size``
    is off).

    The scale is the init checkpoint's ``stage1.langevin.step_size`` over ``cfg``'s: below 1 where Stage 1's
    divergence guard backed its step size off, anything where a sweep or PBT trial chose it. H learned a
    non-convergent short-run chain at that epsilon and samples well only there (HDEBM appendix B), and Stage 2's
    chain starts as that chain. On digits, the H of a Stage 1 backed off once (FID 7.0) scored 44 under Stage 2's
    chain at the preset's step sizes, with no Stage 2 training at all; at the halved ones 8.1.
    """
    if init_dir is None or not cfg.stage2.follow_stage1_step_size:
        return cfg, None
    try:
        if load_meta(init_dir).get("stage") != "stage1":
            return cfg, None
    except FileNotFoundError:  # not a checkpoint of ours: nothing to follow
        return cfg, None
    trained_at = load_config_of(init_dir).stage1.langevin.step_size
    scale = trained_at / cfg.stage1.langevin.step_size
    if scale == 1.0:
        return cfg, None
    line = (
        f"[stage2] Stage 1's H was trained at Langevin step size {trained_at:g}, stage1.langevin.step_size is "
        f"{cfg.stage1.langevin.step_size:g}: Stage 2's step sizes x {scale:g} (stage2.follow_stage1_step_size)"
    )
    # the joint chain's three step sizes (the guard's back-off set), keeping the paper's ratios between them
    return cfg.scaled([f"stage2.{key}" for key in step_sizes], scale), line


class Stage2Sampler(HatSampler):
    """The joint sampler of Stage 2 on (Y, z1, z2) from fresh latents and Y_0 = 0. G1 is frozen in Stage 2: its
    raw weights are its EMA."""

    ema_components = ("energy",)

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.latents(n, seed)
        torch.manual_seed(seed)
        with torch.no_grad():  # deterministic: the Langevin noise that follows is unchanged
            start = self.hat(z1, z2)
        y, _, _, x_gen = sample_joint(
            self.energy, self.hat, z1, z2, modules=(self.hat,), **joint_sampler_kwargs(self.cfg)
        )
        return (x_gen + y).clamp(-1, 1), start.clamp(-1, 1)

    def describe(self) -> str:
        return f"G(z) + Y after {self.cfg.stage2.langevin.steps} joint Langevin steps on (Y, z1, z2)"


class Stage2(StageBase):
    name = "stage2"
    sampler = Stage2Sampler
    starts_from = "stage1"
    in_pipeline = True
    reports = frozenset(ENERGY | {"Langevin/residual_norm", "Langevin/z1_move"})
    backoff = Backoff(
        step_sizes=("langevin.y_step_size", "langevin.z1_step_size", "langevin.z2_step_size"), lrs=("lr",)
    )

    @classmethod
    def networks(cls, cfg: Config):
        return {
            "energy": (lambda: build_energy(cfg), True),
            "generator": (lambda: build_generator(cfg), False),
            "denoiser": (lambda: build_denoiser(cfg), False),
        }

    @classmethod
    def prepare_config(cls, cfg: Config, init_dir: str | None) -> tuple[Config, str | None]:
        """Stage 2's chain at the step size its Stage 1 trained H with (``follow_stage1_chain``)."""
        return follow_stage1_chain(cfg, init_dir, cls.backoff.step_sizes)

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        super().__init__(cfg, ctx, init_dir)
        s = self.s
        self.shape = sample_shape(cfg)
        # Stage 1's samples (and FID) come from its EMA weights of H and G1 where it kept them: start from those.
        names = ["energy", "generator"]
        ema = ema_weights(init_dir, names, map_location=ctx.device) if s.start_from_ema else None
        stage1 = ema or load_states(init_dir, names, map_location=ctx.device)
        self.hat = hat_generator(cfg, ctx, init_dir, g1_state=stage1["generator"])
        self.hat.g1.requires_grad_(False).eval()
        self.hat_fast = fast_hat(self.compute, self.hat, chain=True)
        self.energy = energy_trainer(cfg, ctx, s, s.lr, s.langevin.temperature, compute=self.compute)
        self.energy.net.load_state_dict(stage1["energy"])
        if self.energy.ema is not None:  # the EMA starts at Stage 1's weights, not at a random init
            self.energy.ema.module.load_state_dict(self.energy.net.state_dict())
        self.batches = self.data_stream(seed_offset=3)

    def train_step(self, step: int) -> dict[str, float]:
        x_pos, _ = next(self.batches)
        z1, z2 = latents(self.cfg, len(x_pos), self.shape, self.ctx.device)
        z1_0 = z1.clone()
        stats = StepStats()
        y, z1, z2, x_gen = sample_joint(
            self.energy.fast, self.hat_fast, z1, z2, stats=stats, modules=(self.hat,), **joint_sampler_kwargs(self.cfg)
        )
        metrics = self.energy.update(x_pos, (x_gen + y).detach())
        metrics.update(
            {
                "Langevin/residual_norm": y.flatten(1).norm(dim=1).mean(),
                "Langevin/z1_move": (z1 - z1_0).flatten(1).norm(dim=1).mean(),
                **{f"Langevin/{k}": v for k, v in stats.means().items()},
            }
        )
        return metrics

    def tick_metrics(self, step: int) -> dict[str, float]:
        def sample(n):
            z1, z2 = latents(self.cfg, n, self.shape, self.ctx.device)
            y, _, _, x_gen = sample_joint(
                self.energy.net, self.hat, z1, z2, modules=(self.hat,), **joint_sampler_kwargs(self.cfg)
            )
            return x_gen + y

        return toy2d_tick_metrics(self.cfg, self.ctx, sample)

    def tick_images(self, step: int) -> dict[str, torch.Tensor]:
        def sample(n, generator, use_ema):
            net = self.energy.sampling_net(use_ema)
            z1, z2 = latents(self.cfg, n, self.shape, self.ctx.device, generator)
            y, _, _, x_gen = sample_joint(net, self.hat, z1, z2, modules=(self.hat,), **joint_sampler_kwargs(self.cfg))
            return self.hat(z1, z2).detach(), x_gen + y

        return fixed_sample_grids(self.cfg, self.ctx, sample, "Samples/generator")

    def state_dict(self) -> dict[str, dict]:
        return {
            **self.energy.state_dict(),
            "generator": self.hat.g1.state_dict(),
            "denoiser": self.hat.denoiser.state_dict(),
        }

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.energy.load_state_dict(states)
