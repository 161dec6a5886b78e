"""What every stage and every stage's sampler share: the bookkeeping of a stage's config section (steps, batch,
report and checkpoint cadence), the checks on what it starts from, its per-rank data stream, and default hooks.

A stage class names its section (``section``, default: its ``name``), whether it starts from an earlier stage's
checkpoint (``starts_from``) and whether it needs the bank actor (``uses_bank``); ``StageBase.__init__`` does the
rest. Its sampler (a ``SamplerBase``) is registered next to it in ``stages.SAMPLERS``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.compute import Compute
from ..data.datasets import batch_stream, build_dataset, random_images


def data_stream(cfg: Config, ctx: WorkerContext, batch_size: int, seed_offset: int, name: str = "train"):
    """This rank's share of the global batch of ``batch_size``, forever: the driver's stream ``name`` where it
    streams the data in (``ctx.batches``), else read here with each stage its own ``seed_offset``."""
    if ctx.batches is not None:
        return ctx.batches(name, batch_size // ctx.world_size)
    return batch_stream(
        build_dataset(cfg),
        batch_size // ctx.world_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.run.seed + seed_offset,
        num_workers=cfg.data.num_loader_workers,
        device=ctx.device,
    )


class StageBase:
    """The shared bookkeeping of a stage, and defaults for the optional parts of ``contracts.Stage``."""

    name: ClassVar[str]
    section_name: ClassVar[str | None] = None  # the config section; None: the stage's name
    starts_from: ClassVar[str | None] = None  # what init_dir must hold, for the error when it is missing
    uses_bank: ClassVar[bool] = False  # needs a bank / replay-buffer client in its WorkerContext
    data_streams: ClassVar[tuple[str, ...]] = ("train",)  # the batch streams it reads (``data_stream(name=)``)

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        if self.starts_from and init_dir is None:
            raise ValueError(f"{self.name} starts from {self.starts_from} (init_dir)")
        if self.uses_bank and ctx.bank is None:
            raise ValueError(f"{self.name} needs a bank client in its WorkerContext")
        self.cfg, self.ctx = cfg, ctx
        self.s = getattr(cfg, self.section_name or self.name)
        self.total_steps = self.count_steps(self.s)
        self.report_every, self.checkpoint_every = self.s.report_every, self.s.checkpoint_every
        self.images_per_step = self.s.batch_size
        self.local_batch = self.s.batch_size // ctx.world_size
        self.summary_state: dict[str, Any] = {}
        self.compute = Compute(cfg.compute, ctx.device)  # precision / compile / kernels of every network

    @staticmethod
    def count_steps(section) -> int:
        return section.steps

    def data_stream(self, seed_offset: int):
        return data_stream(self.cfg, self.ctx, self.s.batch_size, seed_offset)

    def summary(self) -> dict[str, Any]:
        return dict(self.summary_state)

    def load_summary(self, summary: dict[str, Any]) -> None:
        self.summary_state = dict(summary)

    def on_start(self, start_step: int) -> None:
        """Called on every rank once weights are restored (or fresh), before the first step."""

    def before_checkpoint(self, step: int) -> None:
        """Called on every rank right before rank 0 saves a checkpoint at ``step``."""

    def tick_metrics(self, step: int) -> dict[str, float]:
        """Extra metrics measured once per report tick (e.g. toy2d mode coverage), added to that report."""
        return {}

    def tick_images(self, step: int) -> dict[str, torch.Tensor]:
        """Sample grids for TensorBoard at a checkpoint tick (rank 0); ``{tag: images}``. A stage that has any
        also gets a grid of dataset images, once."""
        return {}


class SamplerBase:
    """A stage's sampler (``contracts.StageSampler``), built from a checkpoint's config and state_dicts.

    ``location``: where the checkpoint lives (a replay buffer's snapshot lies beside it); ``step``: its step;
    ``protocol``: a baseline's ``buffer`` / ``fresh``, None for its section's default (the other stages sample
    fresh chains whatever is asked, so one ``--protocol`` can apply to a whole run).
    """

    components: ClassVar[tuple[str, ...]] = ()
    ema_components: ClassVar[tuple[str, ...]] = ()
    start_name: ClassVar[str | None] = None

    def __init__(
        self,
        cfg: Config,
        states: dict[str, dict],
        device: torch.device,
        location: str,
        step: int,
        protocol: str | None = None,
    ):
        self.cfg, self.device = cfg, device
        self.protocol, self.uses_weights, self.max_samples = "fresh", True, None

    def describe(self) -> str:
        """What the samples are, in a few words, for the caption of a grid (e.g. "fresh Langevin chains")."""
        return "samples"

    def data(self, n: int, seed: int) -> torch.Tensor:
        """``n`` dataset images (the same for the same seed), on the sampler's device."""
        if not hasattr(self, "dataset"):
            self.dataset = build_dataset(self.cfg)
        return random_images(self.dataset, n, seed).to(self.device)

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError
