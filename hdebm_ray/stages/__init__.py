"""Stage registry: the pipeline's stages in order, each a pure-torch object driven by ``loop.run_loop``."""

from __future__ import annotations

from ..config import Config
from ..loop import WorkerContext
from .diffusion_stage import DiffusionStage
from .distill_stage import DistillStage
from .hdebm_stage1 import Stage1, bank_spec
from .hdebm_stage2 import Stage2
from .icd import ICDStage
from .mjem import MJEMStage
from .replay_ebm import ReplayEBMStage, replay_spec

STAGES = {
    "diffusion": DiffusionStage,
    "distill": DistillStage,
    "stage1": Stage1,
    "stage2": Stage2,
    "mebm": ReplayEBMStage,
    "mjem": MJEMStage,
    "icd": ICDStage,
}
PIPELINE = ["diffusion", "distill", "stage1", "stage2"]
# Which earlier stage's final checkpoint a stage starts from.
INIT_FROM = {"distill": "diffusion", "stage1": "distill", "stage2": "stage1"}
# The baselines (M-EBM, M-JEM, Improved CD) start from nothing: they are not in PIPELINE and have no INIT_FROM.
BASELINES = ("mebm", "mjem", "icd")
# Stages that use the shared bank / replay buffer: {stage: spec(cfg) -> {kind, size, shapes[, reinit_prob]}}.
BANK_SPECS = {"stage1": bank_spec, **{name: replay_spec(name) for name in BASELINES}}


def build_stage(name: str, cfg: Config, ctx: WorkerContext, init_dir=None):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name](cfg, ctx, init_dir)
