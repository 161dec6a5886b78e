"""Stage "mebm": M-EBM (Yang & Ji, Algorithm 1; ALGORITHMS §8) on the shared replay buffer and SGLD.

Each step, on every rank's own batch: chain starts drawn from the replay buffer (the bank actor in replay mode),
a fraction ρ of them re-initialised from p0 = N(μ, Σ) of the training set; K SGLD steps
x ← x − α∇E(x) + σξ on the bare energy net; the CD update E(x⁺) − E(x⁻) + α_reg(E(x⁺)² + E(x⁻)²); the chains'
ends pushed back into the buffer. Samples at test time: K steps from p0, as in training's re-initialised chains.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..data import build_dataset
from ..fid import cache_dir
from ..gaussian_init import GaussianInit, cached_gaussian
from ..langevin import StepStats, frozen, sample_langevin
from ..loop import StageBase, WorkerContext, barrier, status
from ..networks import sample_shape
from .hdebm_common import data_stream, energy_trainer, fixed_sample_grids, toy2d_tick_metrics


def replay_spec(cfg: Config) -> dict:
    """What the driver creates the bank actor with: a replay buffer of chain states."""
    return {
        "kind": "replay",
        "size": cfg.mebm.buffer_size,
        "shapes": {"x": sample_shape(cfg)},
        "reinit_prob": cfg.mebm.reinit_prob,
    }


def fit_p0(cfg: Config) -> GaussianInit:
    d, s = cfg.data, cfg.mebm
    name = f"p0-{d.dataset}-{d.resolution}px-{d.channels}ch-full{s.p0_max_full_dim}-rank{s.p0_rank}"
    return cached_gaussian(build_dataset(cfg), cache_dir(cfg).parent / "p0", name, s.p0_max_full_dim, s.p0_rank)


def sgld_chain(energy, x0: torch.Tensor, sgld, stats=None, steps: int = 0) -> torch.Tensor:
    """K (or ``steps``) SGLD steps x ← x − α∇E(x) + σξ (clipped drift if set) on the bare, frozen network."""
    with frozen(energy):
        k = steps or sgld.steps
        return sample_langevin(energy, x0, k, sgld.step_size, sgld.noise_std, sgld.drift_clip, stats)


def sample_mebm(energy, p0: GaussianInit, cfg: Config, n: int, generator=None, device=None):
    """Test-time samples: p0 draws refined by ``mebm.sample_steps`` (default K) SGLD steps; (p0 draws, samples).

    Training chains persist in the buffer over many steps; sampling a checkpoint has only p0 to start from, so
    a longer chain than K gets closer to what the buffer holds."""
    x0 = p0.sample(n, generator=generator, device=device)
    return x0, sgld_chain(energy, x0, cfg.mebm.sgld, steps=cfg.mebm.sample_steps)


class MEBMStage(StageBase):
    name = "mebm"

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        if ctx.bank is None:
            raise ValueError("mebm needs a replay-buffer client in its WorkerContext")
        s = cfg.mebm
        self.cfg, self.ctx, self.s = cfg, ctx, s
        self.total_steps, self.report_every, self.checkpoint_every = s.steps, s.report_every, s.checkpoint_every
        self.images_per_step = s.batch_size
        self.local_batch = s.batch_size // ctx.world_size
        self.p0 = fit_p0(cfg)
        self.energy = energy_trainer(cfg, ctx, s, s.lr, temperature=1.0, energy_l2=s.energy_l2)
        self.bank = ctx.bank
        self.batches = data_stream(cfg, ctx, s.batch_size, seed_offset=4)
        self.summary_state = {}

    def on_start(self, start_step: int) -> None:
        if self.ctx.is_chief and start_step > 0 and self.bank.restore(start_step) is None:
            status(f"[mebm] no buffer snapshot for step {start_step}; chains restart from p0")
        barrier()

    def before_checkpoint(self, step: int) -> None:
        barrier()  # every rank's push of this step has landed
        if self.ctx.is_chief:
            self.bank.snapshot(step)

    def chain_starts(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer states, with the chains the buffer marks for re-initialisation drawn from p0; and that mask."""
        drawn = self.bank.sample(n)
        dev = self.ctx.device
        x0 = torch.from_numpy(np.array(drawn["x"])).to(dev)
        reinit = torch.from_numpy(np.array(drawn["reinit"])).to(dev)
        if reinit.any():
            x0[reinit] = self.p0.sample(int(reinit.sum()), device=dev)
        return x0, reinit

    def train_step(self, step: int) -> dict[str, float]:
        x_pos, _ = next(self.batches)
        x0, reinit = self.chain_starts(len(x_pos))
        stats = StepStats()
        x_neg = sgld_chain(self.energy.net, x0, self.s.sgld, stats)
        metrics = self.energy.update(x_pos, x_neg)
        self.bank.push(step + 1, x=x_neg)
        metrics.update(
            {
                "Bank/reinit_fraction": reinit.float().mean().item(),
                "Langevin/chain_move": (x_neg - x0).flatten(1).norm(dim=1).mean().item(),
                **{f"Langevin/{k}": v for k, v in stats.means().items()},
            }
        )
        return metrics

    def sample(self, n: int, generator: torch.Generator | None = None, use_ema: bool = False):
        net = self.energy.sampling_net(use_ema)
        return sample_mebm(net, self.p0, self.cfg, n, generator, self.ctx.device)

    def tick_metrics(self, step: int) -> dict[str, float]:
        return toy2d_tick_metrics(self.cfg, self.ctx, lambda n: self.sample(n)[1])

    def tick_images(self, step: int) -> dict[str, torch.Tensor]:
        return fixed_sample_grids(self.cfg, self.ctx, self.sample, "Samples/init")

    def state_dict(self) -> dict[str, dict]:
        return {**self.energy.state_dict("energy"), "p0": self.p0.state_dict()}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.energy.load_state_dict(states, "energy")
        self.p0 = GaussianInit.from_state_dict(states["p0"])
