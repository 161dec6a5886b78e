"""Stage registry: the pipeline's stages in order, each a pure-torch object driven by ``loop.run_loop``."""

from __future__ import annotations

from ..config import Config
from ..loop import WorkerContext
from .diffusion_stage import DiffusionStage
from .distill_stage import DistillStage
from .hdebm_stage1 import Stage1, bank_spec
from .hdebm_stage2 import Stage2
from .mebm import MEBMStage, replay_spec

STAGES = {
    "diffusion": DiffusionStage,
    "distill": DistillStage,
    "stage1": Stage1,
    "stage2": Stage2,
    "mebm": MEBMStage,
}
PIPELINE = ["diffusion", "distill", "stage1", "stage2"]
# Which earlier stage's final checkpoint a stage starts from.
INIT_FROM = {"distill": "diffusion", "stage1": "distill", "stage2": "stage1"}
# Baselines (M-EBM, ...) start from nothing: they are not in PIPELINE and have no INIT_FROM.
# Stages that use the shared bank / replay buffer: {stage: spec(cfg) -> {kind, size, shapes[, reinit_prob]}}.
BANK_SPECS = {"stage1": bank_spec, "mebm": replay_spec}


def build_stage(name: str, cfg: Config, ctx: WorkerContext, init_dir=None):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name](cfg, ctx, init_dir)
