"""Stage "distill": progressive distillation of the truncated DDIM sampler down to one step (docs/algorithms.md §4).

Sub-stage k trains a student on the N0 / 2^(k+1)-step grid so that one student step equals two teacher steps;
the student starts as a copy of its teacher and then becomes the next teacher. At the end of every sub-stage
the mean squared gap between one student step and the teacher's two steps is measured and kept in the
checkpoint's summary, along with the gap between the student's and the teacher's whole samplers.
"""

from __future__ import annotations

import copy
import math

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.diffusion import CosineSchedule, ddim_sample, distill_gap, distill_loss, noise_to_truncation, per_sample_mse
from ..core.optim import TrainedModule
from ..core.ranks import mean_over_ranks
from ..data.datasets import batch_stream, training_dataset
from ..io.checkpoint import load_states
from ..networks import build_denoiser
from .base import StageBase
from .diffusion_stage import TruncatedDiffusionSampler


def set_dropout(module: torch.nn.Module, p: float) -> None:
    """Every dropout layer of ``module`` to probability ``p`` (the distillation students train without dropout)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def distill_total_steps(d) -> int:
    """Steps of the whole distillation: one round of ``steps_per_stage`` per halving of N0 down to one step."""
    return int(math.log2(d.n0_steps)) * d.steps_per_stage


class DistillSampler(TruncatedDiffusionSampler):
    """The distilled student's one step from T' to x_0, on noised data like the diffusion model's sampler."""

    def ddim_steps(self) -> int:
        return 1


class DistillStage(StageBase):
    name = "distill"
    sampler = DistillSampler
    starts_from = "diffusion"
    in_pipeline = True
    count_steps = staticmethod(distill_total_steps)
    reports = frozenset({"Loss/distill", "Opt/grad_norm", "Opt/lr"})
    reports |= {"Distill/sampler_gap_mse", "Distill/step_gap_mse", "Distill/student_steps"}

    @classmethod
    def networks(cls, cfg: Config):
        # the student trains, the teacher is fixed
        return {"denoiser": (lambda: build_denoiser(cfg), True), "teacher": (lambda: build_denoiser(cfg), False)}

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        super().__init__(cfg, ctx, init_dir)
        d = self.s
        self.n_stages = int(math.log2(d.n0_steps))
        self.schedule = CosineSchedule(cfg.diffusion.T, cfg.diffusion.cosine_s)
        teacher_state = load_states(init_dir, ["denoiser"])["denoiser"]
        self.teacher = build_denoiser(cfg).to(ctx.device)
        self.teacher.load_state_dict(teacher_state)
        # The teacher is a fixed function: eval mode, or its dropout would make every target a random draw.
        self.teacher.requires_grad_(False).eval()
        self.student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        set_dropout(self.student, d.student_dropout)
        c = self.compute
        c.layout(self.teacher)
        c.layout(self.student)
        self.ddp = c.fast(ctx.wrap(self.student, "student"))
        self.teacher_fast = c.fast(self.teacher)
        # saved as "denoiser": the student is the one-step G2 that Stage 1 loads
        self.trained = TrainedModule("denoiser", self.student, c, lr=d.lr, grad_clip=d.grad_clip)
        self.gaps: list[dict] = []
        self.batches = self.data_stream(seed_offset=1)
        self._eval_x0 = None

    def n_student(self, step: int) -> int:
        """Student steps of the sub-stage that ``step`` belongs to: N0/2, N0/4, ..., 1."""
        k = step // self.cfg.distill.steps_per_stage
        return self.cfg.distill.n0_steps // 2 ** (k + 1)

    def train_step(self, step: int) -> dict[str, float]:
        d = self.cfg.distill
        n_student = self.n_student(step)
        x0, _ = next(self.batches)
        loss = distill_loss(self.ddp, self.teacher_fast, self.schedule, x0, self.cfg.diffusion.T_trunc, n_student)
        grad_norm = self.trained.step(loss)
        metrics = {
            "Loss/distill": loss.detach(),
            "Opt/grad_norm": grad_norm,
            "Opt/lr": d.lr,
            "Distill/student_steps": n_student,
        }
        if (step + 1) % d.steps_per_stage == 0:
            metrics.update(self._finish_substage(n_student))
        return metrics

    def eval_batch(self) -> torch.Tensor:
        """A fixed batch of this rank's data, for gaps comparable across sub-stages."""
        if self._eval_x0 is None:
            stream = batch_stream(
                training_dataset(self.cfg),
                self.cfg.distill.eval_batch,
                self.ctx.rank,
                self.ctx.world_size,
                seed=12345,
                device=self.ctx.device,
            )
            self._eval_x0 = next(stream)[0]
        return self._eval_x0

    @torch.no_grad()
    def _finish_substage(self, n_student: int) -> dict[str, float]:
        t_trunc = self.cfg.diffusion.T_trunc
        x0 = self.eval_batch()
        self.student.eval()  # measured as the fixed function it will be as the next teacher
        torch.manual_seed(1000 + n_student)
        step_gap = mean_over_ranks(distill_gap(self.student, self.teacher, self.schedule, x0, t_trunc, n_student))
        # Whole samplers from the same x_T': n_student student steps vs 2·n_student teacher steps.
        z = noise_to_truncation(self.schedule, x0, torch.randn_like(x0), t_trunc)
        s_out = ddim_sample(self.student, z, self.schedule, t_trunc, n_student)
        t_out = ddim_sample(self.teacher, z, self.schedule, t_trunc, 2 * n_student)
        sampler_gap = mean_over_ranks(per_sample_mse(s_out, t_out).mean().item())
        self.gaps.append({"student_steps": n_student, "step_gap_mse": step_gap, "sampler_gap_mse": sampler_gap})
        # The student becomes the next teacher; the next student starts from it with a fresh optimiser.
        self.teacher.load_state_dict(self.student.state_dict())
        self.student.train()
        self.trained.reset_optimizer()
        return {"Distill/step_gap_mse": step_gap, "Distill/sampler_gap_mse": sampler_gap}

    def state_dict(self) -> dict[str, dict]:
        return {**self.trained.state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.trained.load_state_dict(states)
        self.teacher.load_state_dict(states["teacher"])

    def summary(self) -> dict:
        return {"distill_gaps": self.gaps}

    def load_summary(self, summary: dict) -> None:
        self.gaps = list(summary.get("distill_gaps", []))
