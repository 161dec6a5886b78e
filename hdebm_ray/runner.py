"""Running a stage without Ray, and the pieces the Ray worker shares with it: metadata, logging, resume.

``run_in_process`` is the single-process path used by tests, benchmarks and debugging; the Ray Train worker
(``ray_worker.py``) does the same with ``ray.train.report`` in place of writing checkpoints itself.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .bank import BankService, LocalBankClient
from .checkpoint import load_meta, load_states, save_checkpoint
from .config import Config
from .loop import WorkerContext, run_loop, status
from .stages import BANK_SPECS, build_stage
from .storage import is_uri, upload


def checkpoint_meta(stage, step: int, resumed_from_step: int = 0, metrics: dict | None = None) -> dict:
    return {
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},  # the report this checkpoint rode on
        "stage": stage.name,
        "step": step,
        "nimg": step * stage.images_per_step,
        "resumed_from_step": resumed_from_step,
        "total_steps": stage.total_steps,
        "done": step >= stage.total_steps,
        "summary": stage.summary(),
        "saved_at": time.time(),
    }


def restore(stage, ckpt_dir, device) -> dict:
    """Load a checkpoint into a stage; returns its metadata (``meta["step"]`` is where to continue)."""
    stage.load_state_dict(load_states(ckpt_dir, map_location=device))
    meta = load_meta(ckpt_dir)
    stage.load_summary(meta.get("summary", {}))
    return meta


def local_bank(cfg: Config, stage_name: str, snapshot_dir: str | None) -> LocalBankClient:
    """The in-process counterpart of the driver's bank actor, built from the same spec."""
    service = BankService(
        **BANK_SPECS[stage_name](cfg),
        snapshot_dir=snapshot_dir,
        seed=cfg.run.seed,
        keep=cfg.ray.checkpoints_to_keep + 1,
    )
    return LocalBankClient(service)


def seed_steps(cfg: Config, rank: int, start_step: int) -> None:
    """Different noise per rank, and a restart does not replay the noise of the steps it redoes."""
    torch.manual_seed(cfg.run.seed * 100003 + rank * 7919 + start_step)


class StageLogger:
    """Rank 0's TensorBoard scalars (x-axis: images seen) and a one-line status per report tick.

    Under a URI storage the events are written to a local directory and copied up after every tick.
    """

    def __init__(self, stage, log_dir: str | None, enabled: bool):
        self.stage, self.writer, self.upload_to, self.data_logged = stage, None, None, False
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            target = f"{log_dir}/{stage.name}"
            if is_uri(target):
                self.upload_to, target = target, tempfile.mkdtemp(prefix="hdebm-tb-")
            self.writer = SummaryWriter(log_dir=target)
        self.enabled = enabled

    def log(self, step: int, metrics: dict[str, float], with_images: bool = False) -> None:
        if not self.enabled:
            return
        nimg = step * self.stage.images_per_step
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, nimg)
            if with_images:
                self._log_images(step, nimg)
            self.writer.flush()
            if self.upload_to:
                upload(self.writer.log_dir, self.upload_to)
        losses = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k.startswith("Loss/"))
        sps = metrics.get("Timing/sec_per_step")
        timing = f" sec/step {sps:.3f}" if sps is not None else ""  # none: a stage with nothing to train
        status(f"[{self.stage.name}] step {step}/{self.stage.total_steps} kimg {nimg / 1000:.1f} {losses}{timing}")

    def _log_images(self, step: int, nimg: int) -> None:
        from .images import data_grid, grid_image

        grids = self.stage.tick_images(step)
        if grids and not self.data_logged:  # stages with grids have a cfg
            grids["Samples/data"] = data_grid(self.stage.cfg)
            self.data_logged = True
        for tag, images in grids.items():
            self.writer.add_image(tag, grid_image(images, self.stage.cfg), nimg)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted(out_dir.glob("checkpoint_*"), key=lambda p: load_meta(p)["step"])
    return ckpts[-1] if ckpts else None


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
    seed_steps(cfg, ctx.rank, start)
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
