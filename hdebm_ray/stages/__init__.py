"""Stage registry: the pipeline's stages in order, each a pure-torch object driven by ``loop.run_loop``, and next
to each its sampler — what inference (``sampling``, FID, OOD, ENFE) asks for instead of branching on names."""

from __future__ import annotations

from ..config import Config
from ..contracts import WorkerContext
from .base import SamplerBase, StageBase
from .diffusion_stage import DiffusionStage, TruncatedDiffusionSampler
from .distill_stage import DistillSampler, DistillStage
from .hdebm_stage1 import Stage1, Stage1Sampler, bank_spec
from .hdebm_stage2 import Stage2, Stage2Sampler
from .icd import ICDSampler, ICDStage
from .mjem import MJEMSampler, MJEMStage
from .replay_ebm import ReplayEBMSampler, ReplayEBMStage, replay_spec

STAGES: dict[str, type[StageBase]] = {
    "diffusion": DiffusionStage,
    "distill": DistillStage,
    "stage1": Stage1,
    "stage2": Stage2,
    "mebm": ReplayEBMStage,
    "mjem": MJEMStage,
    "icd": ICDStage,
}
# How each stage's checkpoints make samples (contracts.StageSampler).
SAMPLERS: dict[str, type[SamplerBase]] = {
    "diffusion": TruncatedDiffusionSampler,
    "distill": DistillSampler,
    "stage1": Stage1Sampler,
    "stage2": Stage2Sampler,
    "mebm": ReplayEBMSampler,
    "mjem": MJEMSampler,
    "icd": ICDSampler,
}
PIPELINE = ["diffusion", "distill", "stage1", "stage2"]
# Which earlier stage's final checkpoint a stage starts from.
INIT_FROM = {"distill": "diffusion", "stage1": "distill", "stage2": "stage1"}
# The baselines (M-EBM, M-JEM, Improved CD) start from nothing: they are not in PIPELINE and have no INIT_FROM.
BASELINES = ("mebm", "mjem", "icd")
# Stages that use the shared bank / replay buffer: {stage: spec(cfg) -> {kind, size, shapes[, reinit_prob]}}.
BANK_SPECS = {"stage1": bank_spec, **{name: replay_spec(name) for name in BASELINES}}


def build_stage(name: str, cfg: Config, ctx: WorkerContext, init_dir=None) -> StageBase:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name](cfg, ctx, init_dir)


def sampler_class(stage: str) -> type[SamplerBase]:
    if stage not in SAMPLERS:
        raise ValueError(f"stage {stage!r} has no sampler; samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[stage]
