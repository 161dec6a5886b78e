"""Running a stage without Ray: the single-process path used by tests, benchmarks and debugging.

The Ray Train worker (``distributed/worker.py``) does the same with ``ray.train.report`` in place of writing
checkpoints itself, and the bank actor in place of the in-process bank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..bank.client import LocalBankClient
from ..bank.service import BankService
from ..config import Config
from ..contracts import WorkerContext
from ..core.ranks import seed_steps
from ..io.checkpoint import checkpoint_meta, latest_checkpoint, load_meta, restore, save_checkpoint_atomically
from ..stages import BANK_SPECS, build_stage
from ..stages.hdebm_stage2 import follow_stage1_chain
from .guard import GuardLog, backed_off, roll_back, step_guard
from .loop import run_loop
from .stage_log import StageLogger


def local_bank(cfg: Config, stage_name: str, snapshot_dir: str | None) -> LocalBankClient:
    """The in-process counterpart of the driver's bank actor, built from the same spec."""
    service = BankService(
        **BANK_SPECS[stage_name](cfg),
        snapshot_dir=snapshot_dir,
        seed=cfg.run.seed,
        keep=cfg.ray.checkpoints_to_keep + 1,
    )
    return LocalBankClient(service)


def run_in_process(
    cfg: Config,
    stage_name: str,
    out_dir: str | Path,
    init_dir=None,
    device: str | torch.device = "cpu",
    log_dir: str | None = None,
):
    """Run one stage in this process (rank 0 of 1), resuming from ``out_dir``'s latest checkpoint; a divergence
    the guard sees rolls back to the latest checkpoint with the stage's step sizes / LRs backed off."""
    out = Path(out_dir)
    log = GuardLog.read(cfg, str(out))
    cfg, followed = follow_stage1_chain(cfg, stage_name, init_dir)
    if followed:
        print(followed, flush=True)
    while True:
        stage, divergence = _attempt(backed_off(cfg, stage_name, log), stage_name, out, init_dir, device, log_dir, log)
        if divergence is None:
            return stage, latest_checkpoint(out)
        last = latest_checkpoint(out)
        to_step = int(load_meta(last)["step"]) if last is not None else 0
        print(roll_back(cfg, stage_name, str(out), log, divergence, to_step), flush=True)


def _attempt(cfg: Config, stage_name: str, out: Path, init_dir, device, log_dir, log: GuardLog):
    torch.manual_seed(cfg.run.seed)
    ctx = WorkerContext(device=torch.device(device))
    if stage_name in BANK_SPECS:
        ctx.bank = local_bank(cfg, stage_name, str(out / "bank"))
    stage = build_stage(stage_name, cfg, ctx, init_dir)
    start = 0
    if (last := latest_checkpoint(out)) is not None:
        start = int(restore(stage, last, ctx.device)["step"])
    seed_steps(cfg.run.seed, ctx.rank, start, attempt=len(log.rollbacks))
    logger = StageLogger(stage, log_dir, enabled=True)

    guard = step_guard(cfg, stage_name, ctx.device, len(log.rollbacks))

    def report(step, metrics, with_ckpt):
        if guard is not None:
            metrics = {**metrics, **log.metrics()}
        logger.log(step, metrics, with_images=with_ckpt)
        if with_ckpt:
            meta = checkpoint_meta(stage, step, start, metrics, guard=log.rollbacks)
            save_checkpoint_atomically(out / f"checkpoint_{step:08d}", stage.state_dict(), cfg, meta)

    divergence = run_loop(stage, start, report, guard)
    if divergence is None and latest_checkpoint(out) is None:  # a stage with nothing to train leaves its product
        report(stage.total_steps, {}, True)
    logger.close()
    return stage, divergence
