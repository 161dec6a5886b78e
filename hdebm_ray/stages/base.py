"""What every stage and every stage's sampler share: the traits a stage declares about itself, the bookkeeping of
its config section (steps, batch, report and checkpoint cadence), its per-rank data stream, and default hooks.

A stage class says everything the rest of the system needs to know of it, in one place (``StageBase``'s class
attributes and class methods): its name (= its config section), the stage whose final checkpoint it starts from,
whether it is one of HDEBM's pipeline stages, its sampler, the batch streams it reads, the metrics it reports, its
bank or replay buffer, which keys the divergence guard backs off, and how it prepares the config it runs with.
``stages/__init__.py`` builds every registry from one tuple of these classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..bank.service import BankSpec
from ..config import Config
from ..contracts import WorkerContext
from ..core.compute import Compute
from ..data.datasets import batch_stream, build_dataset, random_images, training_dataset


def data_stream(cfg: Config, ctx: WorkerContext, batch_size: int, seed_offset: int, name: str = "train"):
    """This rank's share of the global batch of ``batch_size``, forever: the driver's stream ``name`` where it
    streams the data in (``ctx.batches``), else read here with each stage its own ``seed_offset``."""
    if ctx.batches is not None:
        return ctx.batches(name, batch_size // ctx.world_size)
    return batch_stream(
        training_dataset(cfg),
        batch_size // ctx.world_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.run.seed + seed_offset,
        num_workers=cfg.data.num_loader_workers,
        device=ctx.device,
    )


@dataclass(frozen=True)
class Backoff:
    """What a divergence-guard rollback scales, as keys of the stage's own section: its chain's step sizes and its
    learning rates (``guard.backoff_applies_to`` picks either or both)."""

    step_sizes: tuple[str, ...]
    lrs: tuple[str, ...]


class StageBase:
    """The shared bookkeeping of a stage, its declared traits, and defaults for the optional parts of
    ``contracts.Stage``."""

    name: ClassVar[str]  # also the name of its config section
    sampler: ClassVar[type[SamplerBase]]  # how its checkpoints make samples (inference asks for this)
    starts_from: ClassVar[str | None] = None  # the stage whose final checkpoint it starts from (``init_dir``)
    in_pipeline: ClassVar[bool] = False  # one of HDEBM's stages, run in registry order by ``pipeline``
    data_streams: ClassVar[tuple[str, ...]] = ("train",)  # the batch streams it reads (``data_stream(name=)``)
    reports: ClassVar[frozenset[str]] = frozenset()  # metrics it reports itself (``reported.reported_metrics``)
    backoff: ClassVar[Backoff | None] = None  # keys a guard rollback scales; None: the guard does not watch it

    @classmethod
    def bank_spec(cls, cfg: Config) -> BankSpec | None:
        """The shared store it needs in its ``WorkerContext`` (Stage 1's bank, a baseline's replay buffer); None."""
        return None

    @classmethod
    def prepare_config(cls, cfg: Config, init_dir: str | None) -> tuple[Config, str | None]:
        """The config every attempt of the stage runs with, given what it starts from, and a status line saying
        what changed (None: nothing). Stage 2 follows the chain its Stage 1 trained H with."""
        return cfg, None

    @classmethod
    def memory_bytes(cls, cfg: Config) -> int:
        """Bytes a worker holds for the stage's networks (``trained`` / ``frozen`` parameter counts): float32 weights,
        gradients, Adam's two moments and an EMA of each trained one, the frozen ones once; activations not
        counted. What ``--dry-run`` sets against a worker's memory."""
        trained, frozen = cls.parameter_counts(cfg)
        return 4 * (5 * trained + frozen)

    @classmethod
    def networks(cls, cfg: Config) -> dict[str, tuple[Callable[[], nn.Module], bool]]:
        """{checkpoint file name: (how ``cfg`` builds that network, whether the stage trains it)}: what its
        checkpoints carry, for counting (``parameter_counts``) and for checking a checkpoint's weights against a
        config before anything loads (``--dry-run``)."""
        return {}

    @classmethod
    def parameter_counts(cls, cfg: Config) -> tuple[int, int]:
        """(trained, frozen) parameters of the stage's networks, counted on the meta device (nothing allocated)."""
        nets = cls.networks(cfg).values()
        return parameters_of(*(b for b, trained in nets if trained)), parameters_of(*(b for b, t in nets if not t))

    @classmethod
    def section(cls, cfg: Config):
        return getattr(cfg, cls.name)

    @classmethod
    def length(cls, cfg: Config) -> int:
        """The stage's length in steps, as it counts them (distillation: all its halvings)."""
        return cls.count_steps(cls.section(cfg))

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        if self.starts_from and init_dir is None:
            raise ValueError(f"{self.name} starts from a {self.starts_from} checkpoint (init_dir)")
        if self.bank_spec(cfg) is not None and ctx.bank is None:
            raise ValueError(f"{self.name} needs a bank client in its WorkerContext")
        self.cfg, self.ctx = cfg, ctx
        self.s = self.section(cfg)
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


def parameters_of(*builders) -> int:
    """Parameters of the networks the ``builders`` make, built on the meta device: no memory, however large."""
    with torch.device("meta"):
        return sum(p.numel() for build in builders for p in build().parameters())


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
