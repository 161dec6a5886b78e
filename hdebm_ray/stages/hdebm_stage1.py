"""Stage "stage1": HDEBM Algorithm 1 — energy H and generator G1 with the shared bank (docs/algorithms.md §5).

Each step, on every rank's own batch: Langevin on the residual Y from Y_0 = 0 with the latents fixed, the EBM
update of θ on (x⁺, X⁻ = G(z) + Y_K), then the generator update of φ on a leased batch of bank entries, whose
slots are then overwritten with this step's (z1, z2, X⁻). The lease is requested at the start of the step so
the bank round trip overlaps the Langevin chain.
"""

from __future__ import annotations

import time

import torch

from ..bank.service import BankSpec
from ..config import Config
from ..contracts import WorkerContext
from ..core.hat import HatGenerator
from ..core.langevin import StepStats, sample_residual
from ..core.losses import generator_loss
from ..core.optim import TrainedModule
from ..core.ranks import barrier, status
from ..core.transfer import HostStaging
from ..networks import build_denoiser, build_energy, build_generator, latent_shape, sample_shape
from .base import Backoff, StageBase
from .ebm_common import energy_trainer, fixed_sample_grids, restore_snapshot, toy2d_tick_metrics
from .hdebm_common import HatSampler, fast_hat, hat_generator, latents
from .reported import ENERGY, STORE


def sample_stage1(energy, hat, z1, z2, langevin, stats=None):
    """Algorithm 1's chain: G(z1, z2) once (the latents stay fixed), then K Langevin steps on Y; (G(z), Y_K)."""
    with torch.no_grad():
        x_gen = hat(z1, z2)
    lv = langevin
    return x_gen, sample_residual(energy, x_gen, lv.steps, lv.step_size, lv.temperature, lv.drift_clip, stats)


class Stage1Sampler(HatSampler):
    """Fresh z1, z2, X = G(z1, z2) + Y_K after Algorithm 1's K Langevin steps on Y (the training sampler)."""

    ema_components = ("energy", "generator")

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.latents(n, seed)
        torch.manual_seed(seed)
        x_gen, y = sample_stage1(self.energy, self.hat, z1, z2, self.cfg.stage1.langevin)
        return (x_gen + y).clamp(-1, 1), x_gen.clamp(-1, 1)

    def describe(self) -> str:
        return f"G(z) + Y after {self.cfg.stage1.langevin.steps} Langevin steps on Y"


class Stage1(StageBase):
    name = "stage1"
    sampler = Stage1Sampler
    starts_from = "distill"  # the distilled one-step denoiser G2
    in_pipeline = True
    reports = frozenset(STORE | ENERGY | {"Bank/written_fraction", "Langevin/residual_norm", "Loss/generator"})
    reports |= {"Opt/grad_norm_generator", "Opt/lr_generator", "Timing/bank_commit_s", "Timing/bank_wait_s"}
    backoff = Backoff(step_sizes=("langevin.step_size",), lrs=("lr_energy", "lr_generator"))

    @classmethod
    def networks(cls, cfg: Config):
        return {
            "energy": (lambda: build_energy(cfg), True),
            "generator": (lambda: build_generator(cfg), True),
            "denoiser": (lambda: build_denoiser(cfg), False),
        }

    @classmethod
    def bank_spec(cls, cfg: Config) -> BankSpec:
        """N entries of (z1, z2, X⁻)."""
        shape = sample_shape(cfg)
        shapes = {"z1": latent_shape(cfg), "z2": shape, "x": shape}
        return BankSpec(kind="bank", size=cfg.stage1.bank_size, shapes=shapes)

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        super().__init__(cfg, ctx, init_dir)
        s = self.s
        self.shape = sample_shape(cfg)
        self.hat = hat_generator(cfg, ctx, init_dir)
        c = self.compute
        self.hat_fast = fast_hat(c, self.hat)  # the same G through autocast / compiled modules
        self.g1_ddp = c.fast(ctx.wrap(self.hat.g1, "generator"))
        self.energy = energy_trainer(cfg, ctx, s, s.lr_energy, s.langevin.temperature, compute=c)
        self.generator = TrainedModule(
            "generator",
            self.hat.g1,
            c,
            lr=s.lr_generator,
            schedule=s.lr_schedule,
            warmup_steps=s.warmup_steps,
            total_steps=s.steps,
            grad_clip=s.grad_clip,
            ema_halflife_kimg=s.ema_halflife_kimg,
            batch_size=s.batch_size,
        )
        self.staging = HostStaging(ctx.device)
        self._pending_commit = None  # the last step's commit, awaited at the next step (its round trip overlaps)
        self._commit_ok: float | None = None
        self.bank = ctx.bank
        self.batches = self.data_stream(seed_offset=2)
        self.summary_state = {"bank_restores": []}

    # -- bank life cycle ----------------------------------------------------------------------------------

    @torch.no_grad()
    def fill_bank(self, batch: int = 256) -> None:
        """X⁻_i = G(z1_i, z2_i) for fresh latents, in batches (Algorithm 1's initialisation)."""
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.cfg.run.seed + 17)
        for start in range(0, self.s.bank_size, batch):
            n = min(batch, self.s.bank_size - start)
            z1, z2 = latents(self.cfg, n, self.shape, self.ctx.device, gen)
            self.bank.fill(start, 0, z1=z1, z2=z2, x=self.hat_fast(z1, z2))

    def on_start(self, start_step: int) -> None:
        if self.ctx.is_chief:
            # Pinned before the bank is touched: a restart from here on is seen at rank 0's next call or lease.
            self.bank.pin()
            loaded = restore_snapshot(self, start_step, "bank", "refilling from G") if start_step else None
            if loaded is None:
                self.bank.reset()  # also at a fresh start: a failed attempt may have written to this bank
                self.fill_bank()
            if loaded != start_step:  # refilled, or an older snapshot: the audit's counts start here
                self.bank.counts_from(start_step)
        barrier()
        if not self.ctx.is_chief:
            self.bank.pin()

    def commit_landed(self) -> None:
        """Wait for the previous step's commit (sent without waiting); whether it applied is the next metric."""
        if self._pending_commit is not None:
            landed, self._pending_commit = self.bank.wait(self._pending_commit), None
            self._commit_ok = float(landed["ok"])

    def before_checkpoint(self, step: int) -> None:
        self.commit_landed()
        barrier()  # every rank's commit of this step has landed
        if self.ctx.is_chief:
            self.bank.snapshot(step)
            # Whether every step so far wrote each rank's batch to distinct slots, once, through restarts.
            problems = self.bank.audit(step, self.local_batch * self.ctx.world_size)
            self.summary_state["bank_audit"] = {"step": step, "problems": problems}
            if problems:
                status(f"[stage1] bank audit at step {step}: {'; '.join(problems)}")

    # -- one step -------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        s, dev = self.s, self.ctx.device
        pending = self.bank.checkout(self.local_batch, step + 1)
        x_pos, _ = next(self.batches)
        z1, z2 = latents(self.cfg, len(x_pos), self.shape, dev)
        stats = StepStats()
        x_gen, y = sample_stage1(self.energy.fast, self.hat_fast, z1, z2, s.langevin, stats)
        x_neg = (x_gen + y).detach()
        metrics = self.energy.update(x_pos, x_neg)
        self.staging.start_to_host({"z1": z1, "z2": z2, "x": x_neg})  # overlaps the generator update on a GPU

        t0 = time.perf_counter()
        lease = self.bank.wait(pending)  # BankRestarted if the actor came back empty meanwhile
        bank_wait_s = time.perf_counter() - t0
        banked = self.staging.to_device({k: lease[k] for k in ("z1", "z2", "x", "written")})
        loss_g, grad_norm_g = self.update_generator(banked)
        t0 = time.perf_counter()
        self.commit_landed()
        self._pending_commit = self.bank.commit_async(lease["lease"], step + 1, **self.staging.host_arrays())
        bank_commit_s = time.perf_counter() - t0

        metrics.update(
            {
                "Loss/generator": loss_g,
                "Opt/lr_generator": self.generator.lr,
                "Opt/grad_norm_generator": grad_norm_g,
                "Langevin/residual_norm": y.flatten(1).norm(dim=1).mean(),
                "Timing/bank_wait_s": bank_wait_s,
                "Timing/bank_commit_s": bank_commit_s,
                "Bank/written_fraction": banked["written"].float().mean(),
                **{f"Langevin/{k}": v for k, v in stats.means().items()},
            }
        )
        if self._commit_ok is not None:  # the previous commit's (awaited this step or at the checkpoint)
            metrics["Bank/commit_ok"], self._commit_ok = self._commit_ok, None
        if (step + 1) % self.report_every == 0 and self.ctx.is_chief:
            stats = self.bank.stats()
            metrics.update({f"Bank/{k}": float(v) for k, v in stats.items() if v is not None})
        return metrics

    def update_generator(self, banked: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One φ step on leased bank entries (z1, z2, X⁻, written); returns (loss, gradient norm)."""
        s = self.s
        g_raw = self.g1_ddp(banked["z1"])
        # The gradient reaches φ through the frozen G2 (term 1) and directly (term 2).
        x_full = self.hat_fast.g2(g_raw, banked["z2"])
        loss_g = generator_loss(x_full, g_raw, banked["x"], s.beta1, s.beta2, s.gen_loss_scale, banked["written"])
        return loss_g.detach(), self.generator.step(loss_g)

    def tick_metrics(self, step: int) -> dict[str, float]:
        def sample(n):
            x_gen, y = sample_stage1(
                self.energy.net, self.hat, *latents(self.cfg, n, self.shape, self.ctx.device), self.s.langevin
            )
            return x_gen + y

        return toy2d_tick_metrics(self.cfg, self.ctx, sample)

    def tick_images(self, step: int) -> dict[str, torch.Tensor]:
        def sample(n, generator, use_ema):
            hat = self.hat
            if use_ema and self.generator.ema is not None:
                hat = HatGenerator(self.generator.ema.module, self.hat.denoiser, self.hat.schedule, self.hat.t_trunc)
            z1, z2 = latents(self.cfg, n, self.shape, self.ctx.device, generator)
            x_gen, y = sample_stage1(self.energy.sampling_net(use_ema), hat, z1, z2, self.s.langevin)
            return x_gen, x_gen + y

        return fixed_sample_grids(self.cfg, self.ctx, sample, "Samples/generator")

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, dict]:
        return {**self.energy.state_dict(), **self.generator.state_dict(), "denoiser": self.hat.denoiser.state_dict()}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.energy.load_state_dict(states)
        self.generator.load_state_dict(states)
