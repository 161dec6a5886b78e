"""One stage run, written once: the attempt every rank makes, and the rollback loop around attempts.

An **attempt** (``run_attempt``, on every rank) builds the stage from what it starts from, restores the newest usable
checkpoint of the stage (an older one where the newest is incomplete or corrupt), seeds the ranks, trains it through
``loop.run_loop`` with the divergence guard, logs every report tick (``StageLogger``) and hands each report, with its
checkpoint where one is due, to the runner. A divergence stops the attempt before anything after it is saved: rank 0
leaves it in the stage's guard folder.

The **rollback loop** (``fit_with_rollbacks``, once per stage, where the run is driven) prepares the stage's config
(``StageBase.prepare_config``), then runs attempts until one ends without a divergence: before each, a divergence
left by the last attempt is rolled back (``guard.roll_back``) and the stage's keys backed off.

What differs between running a stage in this process and as a Ray Train worker group is a ``StagePort``: the rank's
context, the checkpoint to resume from, and how a report leaves the rank. ``runner.py`` (in process) and
``distributed/worker.py`` + ``distributed/driver.py`` (Ray) are thin adapters of this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config import Config
from ..contracts import WorkerContext
from ..core.ranks import seed_steps, status
from ..io import storage
from ..io.checkpoint import CheckpointError, checkpoint_meta, load_meta, restore, run_checkpoints
from ..stages import build_stage, stage_class
from ..stages.base import StageBase
from .guard import DIVERGENCE_FILE, Divergence, GuardLog, backed_off, roll_back, take_divergence, write_divergence
from .interrupts import Interruption, Stopped, hold_for
from .loop import run_loop
from .stage_log import StageLogger
from .step_guard import step_guard


@dataclass(frozen=True)
class StageJob:
    """What every rank of one attempt needs to know (it crosses the Ray boundary as it is)."""

    cfg: Config  # the attempt's config: prepared by the stage and backed off by the guard's rollbacks so far
    stage: str
    stage_dir: str  # where this stage run's checkpoints go: <run>/<stage> (a PBT chunk: its own Train run)
    guard_dir: str  # the stage's guard files: <run>/<stage> (one log for all of a PBT trial's chunks)
    log_dir: str | None = None  # TensorBoard root: <run>/tb/<stage> is written
    init_from: str | None = None  # the earlier stage's checkpoint this one starts from
    resume_from: str | None = None  # where to start when the stage run has no checkpoint of its own (PBT)
    stop_at_step: int | None = None  # end the run there (a PBT chunk), with a checkpoint
    rollbacks: tuple[dict, ...] = ()  # the guard's, so far (``GuardLog.rollbacks``)
    stop_file: str | None = None  # <run>/stop.json: a stop request, seen by every rank (``interrupts.py``)


@dataclass(frozen=True)
class Chunk:
    """A part of a stage run as its own Train run (a PBT trial's chunk): its name under the run, the checkpoint it
    starts from (None: from the stage's start) and the step it ends at."""

    train_name: str
    resume_from: str | None
    stop_at_step: int


@dataclass(frozen=True)
class StageResult:
    """A finished stage run: its final checkpoint, that checkpoint's step and summary, and rank 0's last report."""

    checkpoint: str
    step: int
    summary: dict = field(default_factory=dict)
    last_report: dict = field(default_factory=dict)

    @classmethod
    def of(cls, checkpoint: str, last_report: dict | None = None) -> StageResult:
        meta = load_meta(checkpoint)
        return cls(checkpoint, int(meta["step"]), meta.get("summary", {}), dict(last_report or meta.get("metrics", {})))


@dataclass(frozen=True)
class CheckpointDraft:
    """What rank 0 hands its port to save with a report: the states, the config and the metadata (``meta.json``)."""

    step: int
    states: dict[str, dict]
    cfg: Config
    meta: dict[str, Any]


class StagePort(Protocol):
    """What differs between the runners: the rank's context, the checkpoint it resumes from, and where a report goes."""

    def context(self, job: StageJob) -> WorkerContext:
        """This rank's ``WorkerContext`` (rank, device, DDP wrapper, bank client, data streams)."""

    def resume_candidate(self, job: StageJob) -> str | None:
        """The checkpoint this attempt should resume from (the newest registered one of the stage run, else
        ``job.resume_from``); None: from the start. An unusable one is passed over for an older one here."""

    def report(self, step: int, metrics: dict[str, float], checkpoint: CheckpointDraft | None) -> None:
        """Every rank, every report tick (a barrier under Ray); rank 0 passes the checkpoint where one is due."""

    def has_own_checkpoint(self) -> bool:
        """Whether this stage run has registered a checkpoint already (a run with nothing left to train still
        registers its product once)."""

    def tick_metrics(self) -> dict[str, float]:
        """Metrics the runner adds to each report before it is logged (e.g. what arrived through Ray Data)."""

    def late_metrics(self) -> dict[str, float]:
        """Metrics added after logging, for the report and checkpoint only (the eval pool's latest FID, which the
        pool logs itself at the step it belongs to)."""

    def after_report(self, rank: int, step: int) -> None:
        """Called on every rank after each report (tests inject faults here)."""

    def interruption(self, job: StageJob, step: int) -> Interruption | None:
        """Every rank, every ``run.interrupt_check_every`` steps, all at the same step: a preemption notice or a
        stop request every rank agrees on, else None."""


class PortInterrupts:
    """``loop.Interrupts`` from a port: its checks every ``run.interrupt_check_every`` steps, a preemption held until
    its deadline plus ``ray.preemption_grace_s``."""

    def __init__(self, port: StagePort, job: StageJob, chief: bool):
        self.port, self.job, self.chief = port, job, chief
        self.every = job.cfg.run.interrupt_check_every
        self.seen: set[float | None] = set()  # deadlines already checkpointed for: one checkpoint per notice

    def check(self, done: int) -> Interruption | None:
        found = self.port.interruption(self.job, done)
        if found is None or (found.kind == "preemption" and found.deadline_s in self.seen):
            return None
        self.seen.add(found.deadline_s)
        return found

    def hold(self, interruption: Interruption) -> None:
        hold_for(interruption, self.job.cfg.ray.preemption_grace_s, self.chief)


def restore_newest_usable(stage: StageBase, candidate: str, stage_dir: str, device, chief: bool) -> tuple[dict, str]:
    """Restore ``candidate``; if it is incomplete or corrupt, the newest usable older one of the stage run. The
    verdicts depend on the files only (an out-of-memory error is raised, not taken for corruption), so every rank walks
    the same list to the same checkpoint. Returns (its meta, its location)."""
    try:
        with storage.local_dir(candidate) as d:
            return restore(stage, d, device), candidate
    except (CheckpointError, FileNotFoundError) as e:
        failed = str(e)
    run_location, name = stage_dir.rstrip("/").rsplit("/", 1)
    newest = candidate.rstrip("/").rsplit("/", 1)[-1]
    # names are checkpoint_<step, 8 digits>[_<ms>]: older ones sort first
    for path in reversed([p for p in run_checkpoints(run_location, [name]) if p.rsplit("/", 1)[-1] < newest]):
        if chief:
            status(f"[{stage.name}] {failed}; trying {path}")
        try:
            with storage.local_dir(path) as d:
                return restore(stage, d, device), path
        except (CheckpointError, FileNotFoundError) as e:
            failed = str(e)
    raise CheckpointError(f"{failed}, and stage {stage.name} has no older usable checkpoint")


def latest_step(stage_dir: str) -> int:
    """The step of the stage run's newest complete, registered checkpoint (what the next attempt resumes from)."""
    run_location, name = stage_dir.rstrip("/").rsplit("/", 1)
    return max([0] + [int(load_meta(p)["step"]) for p in run_checkpoints(run_location, [name])])


@contextlib.contextmanager
def _local_init(init_from: str | None):
    if init_from is None:
        yield None
    else:
        with storage.local_dir(init_from) as d:
            yield d


def run_attempt(job: StageJob, port: StagePort) -> tuple[StageBase, Divergence | Stopped | None]:
    """One attempt at the stage on this rank: to its end (or ``job.stop_at_step``), to the report tick where the
    guard saw a divergence (left in ``job.guard_dir`` by rank 0 for the rollback loop), or to a stop request (after
    a checkpoint at that step)."""
    cfg = job.cfg
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    ctx = port.context(job)
    with _local_init(job.init_from) as init_dir:
        stage = build_stage(job.stage, cfg, ctx, init_dir)
    start, last_metrics = 0, {}
    if (candidate := port.resume_candidate(job)) is not None:
        meta, path = restore_newest_usable(stage, candidate, job.stage_dir, ctx.device, ctx.is_chief)
        start, last_metrics = int(meta["step"]), meta.get("metrics", {})
        if ctx.is_chief:
            status(f"[{stage.name}] resumed from {path} at step {start}")
    rollbacks = list(job.rollbacks)
    seed_steps(cfg.run.seed, ctx.rank, start, attempt=len(rollbacks))
    guard = step_guard(cfg, type(stage), ctx.device, len(rollbacks), chief=ctx.is_chief)
    guard_metrics = GuardLog(rollbacks, cfg.guard.backoff).metrics() if guard is not None else {}
    logger = StageLogger(stage, job.log_dir, enabled=ctx.is_chief)

    def report(step: int, metrics: dict, with_ckpt: bool) -> None:
        metrics = {**metrics, **guard_metrics, **port.tick_metrics()}
        logger.log(step, metrics, with_images=with_ckpt)
        metrics = {**metrics, **port.late_metrics(), "step": step, "nimg": step * stage.images_per_step}
        draft = None
        if with_ckpt and ctx.is_chief:
            meta = checkpoint_meta(stage, step, start, metrics, guard=rollbacks)
            draft = CheckpointDraft(step, stage.state_dict(), cfg, meta)
        port.report(step, metrics, draft)
        port.after_report(ctx.rank, step)

    end = min(job.stop_at_step or stage.total_steps, stage.total_steps)
    try:
        outcome = run_loop(stage, start, report, guard, end, PortInterrupts(port, job, ctx.is_chief))
        if isinstance(outcome, Divergence):  # every rank stops here; the rollback loop backs off and starts again
            if ctx.is_chief:
                write_divergence(job.guard_dir, outcome)
                status(f"[{stage.name}] diverged at {outcome.describe()}")
        elif isinstance(outcome, Stopped):
            if ctx.is_chief:
                status(f"[{stage.name}] stopped at step {outcome.step} on {outcome.reason}, after a checkpoint")
        elif start >= end:
            # Nothing left to train (a re-run of a finished stage, a Tune trial restarted after its run ended): report
            # once anyway, so the caller sees the final metrics, and register the product if the run has none yet.
            report(start, last_metrics, not port.has_own_checkpoint())
    finally:
        logger.close()
    return stage, outcome


def fit_with_rollbacks(
    cfg: Config,
    stage: str,
    init_from: str | None,
    stage_dir: str,
    guard_dir: str,
    attempt: Callable[[Config, tuple[dict, ...]], Any],
    resumes_at: int = 0,
) -> Any:
    """Run ``attempt(config, rollbacks)`` until an attempt ends without a divergence; returns its result.

    The config is the stage's prepared one (``prepare_config``: Stage 2 follows Stage 1's chain), backed off by the
    guard's rollbacks so far. A divergence the last attempt left in ``guard_dir`` (or an attempt whose driver died
    before it rolled back) is counted first, rolling back to the newest checkpoint of ``stage_dir`` (or
    ``resumes_at``, the step a chunk starts from); past ``guard.max_rollbacks`` ``GuardStop`` ends the stage.
    """
    cls = stage_class(stage)
    cfg, note = cls.prepare_config(cfg, init_from)
    if note:
        print(note, flush=True)
    log = GuardLog.read(cfg, guard_dir) if cls.backoff is not None else None
    while True:
        if log is not None and (divergence := take_divergence(guard_dir)) is not None:
            to_step = max(resumes_at, latest_step(stage_dir))
            print(roll_back(cfg, stage, guard_dir, log, divergence, to_step), flush=True)
        attempt_cfg = backed_off(cfg, stage, log) if log is not None else cfg
        result = attempt(attempt_cfg, tuple(log.rollbacks) if log is not None else ())
        if log is None or not storage.exists(f"{guard_dir}/{DIVERGENCE_FILE}"):
            return result
