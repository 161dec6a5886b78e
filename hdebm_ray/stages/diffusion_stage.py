"""Stage "diffusion": train the truncated x0-predicting diffusion model D (docs/algorithms.md §3)."""

from __future__ import annotations

from ..config import Config
from ..data import batch_stream, build_dataset
from ..diffusion import CosineSchedule, diffusion_loss
from ..loop import StageBase, WorkerContext
from ..networks import build_denoiser
from ..optim import adam_with_schedule, layerwise_clip_


class DiffusionStage(StageBase):
    name = "diffusion"

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        d = cfg.diffusion
        self.cfg, self.ctx = cfg, ctx
        self.total_steps, self.report_every, self.checkpoint_every = d.steps, d.report_every, d.checkpoint_every
        self.images_per_step = d.batch_size
        self.schedule = CosineSchedule(d.T, d.cosine_s)
        self.model = build_denoiser(cfg).to(ctx.device)
        self.ddp = ctx.wrap(self.model, "denoiser")
        self.opt, self.lr_sched = adam_with_schedule(
            self.model.parameters(), d.lr, d.lr_schedule, d.warmup_steps, d.steps
        )
        self.batches = batch_stream(
            build_dataset(cfg),
            d.batch_size // ctx.world_size,
            ctx.rank,
            ctx.world_size,
            seed=cfg.run.seed,
            num_workers=cfg.data.num_loader_workers,
            device=ctx.device,
        )

    def train_step(self, step: int) -> dict[str, float]:
        x0, _ = next(self.batches)
        d = self.cfg.diffusion
        loss = diffusion_loss(self.ddp, self.schedule, x0, d.T_trunc, d.loss_weighting)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = layerwise_clip_(self.model.parameters(), self.cfg.diffusion.grad_clip)
        self.opt.step()
        self.lr_sched.step()
        return {"Loss/diffusion": loss.item(), "Opt/grad_norm": grad_norm, "Opt/lr": self.opt.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, dict]:
        return {
            "denoiser": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "lr_sched": self.lr_sched.state_dict(),
        }

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.model.load_state_dict(states["denoiser"])
        self.opt.load_state_dict(states["optimizer"])
        self.lr_sched.load_state_dict(states["lr_sched"])
