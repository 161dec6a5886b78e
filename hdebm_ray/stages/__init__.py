"""The stage registry, built from one tuple of stage classes: each class declares what the rest of the system needs
to know of it (``base.StageBase``: what it starts from, its sampler, its bank or buffer, what the guard backs off,
what it reports). HDEBM's pipeline is its ``in_pipeline`` stages in this order; the baselines (M-EBM, M-JEM,
Improved CD) start from nothing and stand alone."""

from __future__ import annotations

from ..config import Config
from ..contracts import WorkerContext
from .base import Backoff, SamplerBase, StageBase
from .diffusion_stage import DiffusionStage
from .distill_stage import DistillStage
from .hdebm_stage1 import Stage1
from .hdebm_stage2 import Stage2
from .icd import ICDStage
from .mjem import MJEMStage
from .replay_ebm import ReplayEBMStage
from .reported import DATA, EVAL, LOOP, OBSERVED

STAGE_CLASSES: tuple[type[StageBase], ...] = (
    DiffusionStage,
    DistillStage,
    Stage1,
    Stage2,
    ReplayEBMStage,
    MJEMStage,
    ICDStage,
)
STAGES: dict[str, type[StageBase]] = {cls.name: cls for cls in STAGE_CLASSES}
# How each stage's checkpoints make samples (contracts.StageSampler).
SAMPLERS: dict[str, type[SamplerBase]] = {cls.name: cls.sampler for cls in STAGE_CLASSES}
PIPELINE: list[str] = [cls.name for cls in STAGE_CLASSES if cls.in_pipeline]
# The stages the divergence guard watches: those that declare what a rollback backs off.
GUARDED: tuple[str, ...] = tuple(cls.name for cls in STAGE_CLASSES if cls.backoff is not None)

__all__ = ["Backoff", "PIPELINE", "SAMPLERS", "STAGES", "STAGE_CLASSES", "build_stage", "sampler_class", "stage_class"]


def stage_class(name: str) -> type[StageBase]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def build_stage(name: str, cfg: Config, ctx: WorkerContext, init_dir=None) -> StageBase:
    return stage_class(name)(cfg, ctx, init_dir)


def sampler_class(stage: str) -> type[SamplerBase]:
    if stage not in SAMPLERS:
        raise ValueError(f"stage {stage!r} has no sampler; samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[stage]


def reported_metrics(stage: str, streams: tuple[str, ...] | None = None) -> set[str]:
    """Every key stage ``stage`` can report: its own, the step loop's, the eval pool's and, per data stream it reads
    (``streams``, default its own), what arrived through Ray Data."""
    cls = stage_class(stage)
    streams = cls.data_streams if streams is None else streams
    data = DATA | {f"Data/{s}_{what}" for s in streams for what in ("batches", "epochs")}
    return set(cls.reports) | LOOP | EVAL | data | (OBSERVED if cls.backoff is not None else set())
