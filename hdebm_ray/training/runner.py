"""Running a stage in this process, without Ray: the single-process adapter of ``session.py`` (tests, benchmarks,
debugging). Rank 0 of 1; the bank or replay buffer is an in-process ``BankService``; checkpoints are written
straight into the stage's folder, each under a temporary name renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..bank.client import LocalBankClient
from ..bank.service import BankService
from ..config import Config
from ..contracts import WorkerContext
from ..io.checkpoint import latest_checkpoint, save_checkpoint_atomically
from ..io.storage import run_dir
from ..stages import stage_class
from .interrupts import Interruption, RunStopped, Stopped, StopRequest, stop_requested
from .session import CheckpointDraft, StageJob, StageResult, fit_with_rollbacks, run_attempt


def local_bank(cfg: Config, stage_name: str, snapshot_dir: str | None) -> LocalBankClient:
    """The in-process counterpart of the driver's bank actor, built from the stage's own spec."""
    spec = stage_class(stage_name).bank_spec(cfg)
    service = BankService(**spec.arguments(), snapshot_dir=snapshot_dir, seed=cfg.run.seed, keep=bank_keep(cfg))
    return LocalBankClient(service)


def bank_keep(cfg: Config) -> int:
    """Bank snapshots kept: one more than checkpoints, so whichever checkpoint a resume uses finds its own."""
    return cfg.ray.checkpoints_to_keep + 1


class InProcessPort:
    """``session.StagePort`` of a single process: checkpoints written to ``stage_dir`` by this process."""

    def __init__(self, device: torch.device):
        self.device, self.out = device, None

    def context(self, job: StageJob) -> WorkerContext:
        self.out = Path(job.stage_dir)
        ctx = WorkerContext(device=self.device)
        if stage_class(job.stage).bank_spec(job.cfg) is not None:
            ctx.bank = local_bank(job.cfg, job.stage, str(self.out / "bank"))
        return ctx

    def resume_candidate(self, job: StageJob) -> str | None:
        last = latest_checkpoint(self.out)
        return str(last) if last is not None else job.resume_from

    def report(self, step: int, metrics: dict, checkpoint: CheckpointDraft | None) -> None:
        if checkpoint is not None:
            directory = self.out / f"checkpoint_{step:08d}"
            save_checkpoint_atomically(directory, checkpoint.states, checkpoint.cfg, checkpoint.meta)

    def has_own_checkpoint(self) -> bool:
        return latest_checkpoint(self.out) is not None

    def tick_metrics(self) -> dict:
        return {}

    def late_metrics(self) -> dict:
        return {}

    def after_report(self, rank: int, step: int) -> None:
        pass

    def interruption(self, job: StageJob, step: int) -> Interruption | None:
        reason = stop_requested(job.stop_file)  # SIGTERM to this process (``StopRequest``)
        return Interruption("stop", reason) if reason else None


def run_in_process(
    cfg: Config,
    stage_name: str,
    out_dir: str | Path,
    init_dir=None,
    device: str | torch.device = "cpu",
    log_dir: str | None = None,
):
    """Run one stage in this process (rank 0 of 1), resuming from ``out_dir``'s latest checkpoint; a divergence
    the guard sees rolls back to the latest checkpoint with the stage's step sizes / LRs backed off. Returns the
    last attempt's stage and the final checkpoint's path."""
    out = Path(out_dir)
    port = InProcessPort(torch.device(device))
    init = str(init_dir) if init_dir is not None else None

    outcome = {}

    def attempt(attempt_cfg: Config, rollbacks: tuple[dict, ...]):
        job = StageJob(
            attempt_cfg, stage_name, str(out), str(out), log_dir, init_from=init, rollbacks=rollbacks, stop_file=stop
        )
        stage, outcome["end"] = run_attempt(job, port)
        return stage

    with StopRequest(str(out)) as request:
        stop = request.path
        stage = fit_with_rollbacks(cfg, stage_name, init, str(out), str(out), attempt)
        if isinstance(outcome.get("end"), Stopped):
            raise RunStopped(
                f"stage {stage_name} stopped at step {outcome['end'].step} on {request.reason} after a checkpoint in "
                f"{out}; the same call resumes it"
            )
    return stage, latest_checkpoint(out)


def fit_in_process(cfg: Config, stage: str, init_from: str | None = None, device="cpu") -> StageResult:
    """``run_in_process`` in the run's own layout (``<run>/<stage>``, TensorBoard in ``<run>/tb``): the fit function
    of an in-process ``pipeline.run_pipeline``."""
    run = run_dir(cfg)
    _, last = run_in_process(cfg, stage, f"{run}/{stage}", init_from, device, log_dir=f"{run}/tb")
    if last is None:
        raise RuntimeError(f"stage {stage!r} finished without a checkpoint in {run}/{stage}")
    return StageResult.of(str(last))
