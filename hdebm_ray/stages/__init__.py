"""Stage registry: the pipeline's stages in order, each a pure-torch object driven by ``loop.run_loop``."""

from __future__ import annotations

from ..config import Config
from ..loop import WorkerContext
from .diffusion_stage import DiffusionStage
from .distill_stage import DistillStage

STAGES = {"diffusion": DiffusionStage, "distill": DistillStage}
PIPELINE = ["diffusion", "distill"]
# Which earlier stage's final checkpoint a stage starts from.
INIT_FROM = {"distill": "diffusion"}


def build_stage(name: str, cfg: Config, ctx: WorkerContext, init_dir=None):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name](cfg, ctx, init_dir)
