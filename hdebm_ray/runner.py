"""Running a stage without Ray: the single-process path used by tests, benchmarks and debugging.

The Ray Train worker (``distributed/worker.py``) does the same with ``ray.train.report`` in place of writing
checkpoints itself, and the bank actor in place of the in-process bank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .bank import BankService, LocalBankClient
from .checkpoint import checkpoint_meta, latest_checkpoint, restore, save_checkpoint
from .config import Config
from .contracts import WorkerContext
from .loop import run_loop, seed_steps
from .stage_log import StageLogger
from .stages import BANK_SPECS, build_stage


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
    """Run one stage in this process (rank 0 of 1), resuming from ``out_dir``'s latest checkpoint."""
    out = Path(out_dir)
    torch.manual_seed(cfg.run.seed)
    ctx = WorkerContext(device=torch.device(device))
    if stage_name in BANK_SPECS:
        ctx.bank = local_bank(cfg, stage_name, str(out / "bank"))
    stage = build_stage(stage_name, cfg, ctx, init_dir)
    start = 0
    if (last := latest_checkpoint(out)) is not None:
        start = int(restore(stage, last, ctx.device)["step"])
    seed_steps(cfg.run.seed, ctx.rank, start)
    logger = StageLogger(stage, log_dir, enabled=True)

    def report(step, metrics, with_ckpt):
        logger.log(step, metrics, with_images=with_ckpt)
        if with_ckpt:
            save_checkpoint(
                out / f"checkpoint_{step:08d}", stage.state_dict(), cfg, checkpoint_meta(stage, step, start, metrics)
            )

    run_loop(stage, start, report)
    if latest_checkpoint(out) is None:  # a stage with nothing to train still leaves its product
        report(stage.total_steps, {}, True)
    logger.close()
    return stage, latest_checkpoint(out)
