"""The Ray Train worker: one DDP rank of a stage attempt (``training.session.run_attempt``), with Ray as its port.

Checkpoints ride on ``ray.train.report`` (a barrier every rank calls equally often; rank 0 attaches the checkpoint).
A restarted or re-run worker resumes from ``ray.train.get_checkpoint()``; a new Train run given
``job.resume_from`` (the next chunk of a PBT trial) from that checkpoint, and ``job.stop_at_step`` ends it early.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import ray.train
import ray.train.torch
from ray.train.collective import broadcast_from_rank_zero

from ..contracts import WorkerContext
from ..io.checkpoint import save_checkpoint
from ..io.ownership import check_run_visible
from ..io.software import check_same_software
from ..io.storage import as_uri
from ..training.interrupts import Interruption, stop_requested
from ..training.session import CheckpointDraft, StageJob, run_attempt
from .bank_actor import ActorBankClient
from .cluster import PREEMPTION_WATCHER
from .eval_pool import LatestEval
from .ray_compat import quiet_train_report_log
from .ray_data import WorkerStreams, uses_ray_data


@dataclass(frozen=True)
class WorkerJob:
    """A Train worker's job: the stage attempt, and the Ray side of it."""

    job: StageJob
    bank_actor: str | None = None  # the stage's bank / replay-buffer actor, by name
    eval_pool: str | None = None  # the run's eval pool: rank 0 adds its newest Eval/fid to the reports
    report_hooks: tuple = field(default=())  # callables hook(rank=, step=) after every report (tests inject faults)
    run: str = ""  # the run's identity (``ownership.run_identity``): each worker checks it sees the run's folder
    software: dict = field(default_factory=dict)  # the driver's software_fingerprint(): each worker must match it


class RayPort:
    """``session.StagePort`` of a Ray Train worker."""

    def __init__(self, work: WorkerJob):
        self.work, self.streams, self.latest_eval = work, None, None

    def context(self, job: StageJob) -> WorkerContext:
        tctx = ray.train.get_context()
        rank = tctx.get_world_rank()
        ctx = WorkerContext(
            rank=rank,
            world_size=tctx.get_world_size(),
            device=ray.train.torch.get_device(),
            wrap_fn=lambda m: ray.train.torch.prepare_model(m),
        )
        if uses_ray_data(job.cfg):
            self.streams = ctx.batches = WorkerStreams(job.cfg, ctx.device)
        if self.work.bank_actor:
            ctx.bank = ActorBankClient(self.work.bank_actor, owner=f"rank{rank}", timeout_s=job.cfg.ray.bank_timeout_s)
        if self.work.eval_pool and rank == 0:
            self.latest_eval = LatestEval(self.work.eval_pool, job.stage)
        self.rank = rank
        return ctx

    def resume_candidate(self, job: StageJob) -> str | None:
        ckpt = ray.train.get_checkpoint()  # this Train run's own, after a restart
        return as_uri(ckpt.path, job.stage_dir) if ckpt is not None else job.resume_from

    def report(self, step: int, metrics: dict, checkpoint: CheckpointDraft | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, checkpoint.states, checkpoint.cfg, checkpoint.meta)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{step:08d}_{int(time.time() * 1000)}",
            )

    def has_own_checkpoint(self) -> bool:
        return ray.train.get_checkpoint() is not None

    def tick_metrics(self) -> dict:
        return self.streams.metrics() if self.streams is not None else {}  # rank 0's batches and epochs

    def late_metrics(self) -> dict:
        return self.latest_eval.poll() if self.latest_eval is not None else {}

    def after_report(self, rank: int, step: int) -> None:
        for hook in self.work.report_hooks:
            hook(rank=rank, step=step)

    def interruption(self, job: StageJob, step: int) -> Interruption | None:
        """Rank 0's view of the stop request, broadcast (one barrier); then Ray's preemption notice (another), where
        Ray watches for them (not on an embedded local Ray: one machine has no node to lose)."""
        reason = broadcast_from_rank_zero(stop_requested(job.stop_file) if self.rank == 0 else None)
        if reason:
            return Interruption("stop", reason)
        if os.environ.get(PREEMPTION_WATCHER, "1") == "0":
            return None
        notice = ray.train.get_preemption_info()
        if notice is None:
            return None
        deadline = notice.deadline_ms / 1000 if notice.deadline_ms else None
        return Interruption(
            "preemption", f"preemption notice for node(s) {', '.join(notice.preempted_node_ids)}", deadline
        )


def train_loop_per_worker(work: WorkerJob) -> None:
    quiet_train_report_log()
    if work.software:  # a node the autoscaler added mid-run may have installed other versions
        check_same_software(work.software, "a train worker")
    if work.run:  # a node the autoscaler added after the driver's storage check may not mount the run's folder
        check_run_visible(work.run.split("@", 1)[1], work.run)
    run_attempt(work.job, RayPort(work))
