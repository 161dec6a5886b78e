"""The interfaces the pieces meet at: where a stage runs (``WorkerContext``), and as ``typing.Protocol``s what a
stage offers the step loop, what a stage's sampler offers inference, and what the bank and replay-buffer clients
offer a stage.

Nothing here runs; the implementations are ``stages.base.StageBase`` and its subclasses, the samplers next to
each stage (``stages.SAMPLERS``), ``bank_client.LocalBankClient`` (in process) and ``distributed.bank_actor.
ActorBankClient`` (a Ray actor); a test checks each implementation against its protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SnapshotClient(Protocol):
    """What both the bank and the replay buffer offer: bulk fill, counters, and snapshots beside checkpoints."""

    def fill(self, start: int, step: int, **fields: Any) -> None:
        """Write ``fields`` (arrays of equal length n) into slots ``start .. start+n-1`` at ``step``."""

    def stats(self) -> dict[str, float]:
        """Counters for TensorBoard (fill, slot age, refused writes, ...)."""

    def snapshot(self, step: int) -> str:
        """Save the whole store as of ``step``; returns where."""

    def restore(self, step: int | None = None) -> int | None:
        """Load the snapshot of ``step`` (None: the latest); the step restored, None if there is none."""

    def pin(self) -> str:
        """Pin the store's generation (when the stage starts): from then on a call or lease that finds the actor
        restarted (empty) raises ``bank.BankRestarted``."""


@runtime_checkable
class BankClient(SnapshotClient, Protocol):
    """HDEBM Stage 1's shared bank of (z1, z2, X⁻): leased batches, committed back in place."""

    def checkout(self, n: int, step: int | None = None) -> Any:
        """Ask for a lease of ``n`` entries to be committed with ``step``; returns a handle (``wait`` turns it into
        the lease) so the round trip can overlap the step's Langevin chain."""

    def wait(self, handle: Any) -> dict:
        """The lease: ``{"lease": id, "idx": slots, "generation": the bank's, <field>: array, ...}``."""

    def commit(self, lease_id: str, step: int, **fields: Any) -> bool:
        """Overwrite the leased slots; False if the lease was reclaimed meanwhile (the write is dropped)."""

    def commit_async(self, lease_id: str, step: int, **fields: Any) -> Any:
        """``commit`` without waiting for it: a handle that ``wait`` turns into ``{"ok": bool}``. The fields are
        copied before it returns, and the bank applies one caller's calls in order."""

    def audit(self, last_step: int, global_batch: int) -> list[str]:
        """What breaks "one committer per slot per step" in steps 1..last_step ([] if nothing)."""

    def reset(self) -> None:
        """Empty the bank (before a fill)."""

    def counts_from(self, step: int) -> None:
        """The audit's per-step counts are complete only after ``step`` (a refill or an older snapshot)."""


@runtime_checkable
class ReplayClient(SnapshotClient, Protocol):
    """A baseline's replay buffer of persistent chains."""

    def sample(self, n: int, extra: int = 0) -> dict:
        """Lease ``n`` chain starts (``x``, ``reinit``, ``idx``, ``filled``, ``generation``) and ``extra``
        read-only ``reference`` states."""

    def push(self, lease_id: str, step: int, **fields: Any) -> bool:
        """Write the chain ends back by the buffer's write policy; False if the lease was reclaimed."""


@dataclass
class WorkerContext:
    """Where a stage runs: its rank, the world size, its device and how to wrap a trained model (DDP)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_fn: Callable[[nn.Module], nn.Module] = lambda m: m
    # the bank / replay-buffer client of a stage that uses one (bank_client.LocalBankClient, or the Ray actor's client)
    bank: BankClient | ReplayClient | None = None
    # every module the stage trained through ``wrap``, by name: compared across ranks at each checkpoint
    replicated: dict[str, nn.Module] = field(default_factory=dict)
    # (stream name, this rank's batch size) -> endless (images, labels) on ``device``, from a dataset the driver
    # streams in (Ray Data); None: each stage reads the dataset itself (``data.batch_stream``)
    batches: Callable[[str, int], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, name: str | None = None) -> nn.Module:
        """``module`` wrapped for data-parallel training (DDP under Ray Train), and remembered for the replica
        check at every checkpoint."""
        self.replicated[name or f"{type(module).__name__} #{len(self.replicated)}"] = module
        return self.wrap_fn(module)


@runtime_checkable
class Stage(Protocol):
    """A training stage as ``loop.run_loop`` drives it: steps, named plain state_dicts, and hooks."""

    name: str
    ctx: WorkerContext  # where it runs; ``ctx.replicated`` holds the modules compared across ranks
    total_steps: int
    images_per_step: int
    report_every: int
    checkpoint_every: int

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step on every rank; metrics averaged over the report tick."""

    def state_dict(self) -> dict[str, dict]:
        """Every component's plain state_dict by name (one ``<name>.pt`` each in a checkpoint)."""

    def load_state_dict(self, states: dict[str, dict]) -> None: ...

    def summary(self) -> dict[str, Any]:
        """JSON-able facts kept in checkpoint metadata (e.g. distillation gaps, bank restores)."""

    def load_summary(self, summary: dict[str, Any]) -> None: ...

    def on_start(self, start_step: int) -> None:
        """On every rank once weights are restored (or fresh), before the first step."""

    def before_checkpoint(self, step: int) -> None:
        """On every rank right before rank 0 saves the checkpoint of ``step``."""

    def tick_metrics(self, step: int) -> dict[str, float]:
        """Extra metrics measured once per report tick."""

    def tick_images(self, step: int) -> dict[str, torch.Tensor]:
        """Sample grids ``{tag: images}`` for TensorBoard at a checkpoint tick (rank 0)."""


@runtime_checkable
class StageSampler(Protocol):
    """How a stage's checkpoint makes samples: built from the checkpoint's config and state_dicts."""

    components: ClassVar[tuple[str, ...]]  # the state_dicts it is built from
    ema_components: ClassVar[tuple[str, ...]]  # those trained with an EMA copy (``<name>_ema.pt``)
    start_name: ClassVar[str | None]  # what its chains start from, as results name it; None: no chains
    protocol: str  # "fresh" chains, or a baseline's "buffer" (the replay buffer's chains themselves)
    uses_weights: bool  # False when its samples involve no network weights (the buffer protocol)
    max_samples: int | None  # how many distinct samples there are, None when unbounded

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` samples in [-1, 1] and their chain starts (None when it has no chains)."""
