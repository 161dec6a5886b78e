"""The Ray Train worker: one DDP rank running a stage through the shared step loop.

Checkpoints ride on ``ray.train.report`` (a barrier every rank calls equally often; rank 0 attaches the
checkpoint). A restarted or re-run worker resumes from ``ray.train.get_checkpoint()``; a new Train run given
``resume_from`` (the next chunk of a PBT trial) from that checkpoint, and ``stop_at_step`` ends it early.
"""

from __future__ import annotations

import tempfile
import time

import ray.train
import ray.train.torch
import torch

from ..config import from_dict
from ..contracts import WorkerContext
from ..core.ranks import seed_steps, status
from ..io.checkpoint import CheckpointError, checkpoint_meta, restore, save_checkpoint
from ..stages import build_stage
from ..training.guard import GuardLog, step_guard, write_divergence
from ..training.loop import run_loop
from ..training.stage_log import StageLogger
from .bank_actor import ActorBankClient
from .eval_pool import LatestEval
from .ray_compat import quiet_train_report_log
from .ray_data import WorkerStreams, uses_ray_data


def restore_newest_usable(stage, ckpt, stage_dir: str, device, chief: bool) -> tuple[dict, str]:
    """Restore Ray's checkpoint ``ckpt``; if it is incomplete or corrupt, the newest usable older one of the
    stage. The verdicts depend on the files only (an out-of-memory error is raised, not taken for corruption),
    so every rank walks the same list to the same checkpoint. Returns (its meta, its path)."""
    from ..io.checkpoint import run_checkpoints

    try:
        with ckpt.as_directory() as d:
            return restore(stage, d, device), ckpt.path
    except (CheckpointError, FileNotFoundError) as e:
        failed = str(e)
    run_location, name = stage_dir.rsplit("/", 1)
    ray_name = ckpt.path.rstrip("/").rsplit("/", 1)[-1]
    # names are checkpoint_<step, 8 digits>_<ms>: older ones sort first
    for path in reversed([p for p in run_checkpoints(run_location, [name]) if p.rsplit("/", 1)[-1] < ray_name]):
        if chief:
            status(f"[{stage.name}] {failed}; trying {path}")
        try:
            with ray.train.Checkpoint(path).as_directory() as d:
                return restore(stage, d, device), path
        except (CheckpointError, FileNotFoundError) as e:
            failed = str(e)
    raise CheckpointError(f"{failed}, and stage {stage.name} has no older usable checkpoint")


def train_loop_per_worker(loop_config: dict) -> None:
    quiet_train_report_log()
    cfg = from_dict(loop_config["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        wrap_fn=lambda m: ray.train.torch.prepare_model(m),
    )
    streams = WorkerStreams(cfg, ctx.device) if uses_ray_data(cfg) else None
    ctx.batches = streams
    if loop_config.get("bank_name"):
        ctx.bank = ActorBankClient(loop_config["bank_name"], owner=f"rank{rank}")
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    init_from = loop_config.get("init_from")
    if init_from:
        with ray.train.Checkpoint(init_from).as_directory() as init_dir:
            stage = build_stage(loop_config["stage"], cfg, ctx, init_dir)
    else:
        stage = build_stage(loop_config["stage"], cfg, ctx, None)

    start, last_metrics = 0, {}
    ckpt = ray.train.get_checkpoint()  # this Train run's own, after a restart
    if ckpt is None and loop_config.get("resume_from"):  # another run's (a PBT trial's next chunk, or its donor's)
        ckpt = ray.train.Checkpoint(loop_config["resume_from"])
    if ckpt is not None:
        meta, path = restore_newest_usable(stage, ckpt, loop_config["stage_dir"], ctx.device, rank == 0)
        start, last_metrics = int(meta["step"]), meta.get("metrics", {})
        if rank == 0:
            status(f"[{stage.name}] resumed from {path} at step {start}")
    rollbacks = loop_config.get("guard_rollbacks") or []  # this stage's, so far (``guard.GuardLog``)
    seed_steps(cfg.run.seed, rank, start, attempt=len(rollbacks))
    guard = step_guard(cfg, stage.name, ctx.device, len(rollbacks))
    guard_metrics = GuardLog(rollbacks, cfg.guard.backoff).metrics() if guard is not None else {}

    logger = StageLogger(stage, loop_config.get("log_dir"), enabled=rank == 0)
    report_hooks = loop_config.get("report_hooks") or ()  # callables (rank, step), e.g. a test's fault injection
    pool = loop_config.get("eval_pool")
    latest_eval = LatestEval(pool, stage.name) if pool and rank == 0 else None

    def report(step: int, metrics: dict, with_ckpt: bool) -> None:
        metrics = {**metrics, **guard_metrics}
        if streams is not None:  # batches and epochs that arrived through Ray Data (rank 0's)
            metrics = {**metrics, **streams.metrics()}
        logger.log(step, metrics, with_images=with_ckpt)
        # After logging: the pool itself writes Eval/* to TensorBoard at the evaluated checkpoint's images seen.
        extra = latest_eval.poll() if latest_eval is not None else {}
        metrics = {**metrics, **extra, "step": step, "nimg": step * stage.images_per_step}
        if with_ckpt and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                meta = checkpoint_meta(stage, step, start, metrics, guard=rollbacks)
                save_checkpoint(tmp, stage.state_dict(), cfg, meta)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_{step:08d}_{int(time.time() * 1000)}",
                )
        else:
            ray.train.report(metrics)
        for hook in report_hooks:
            hook(rank=rank, step=step)

    stop_at = loop_config.get("stop_at_step") or stage.total_steps
    divergence = run_loop(stage, start, report, guard, stop_at)
    if divergence is not None:  # every rank stops here; the driver rolls back and starts the next attempt
        if rank == 0:
            write_divergence(loop_config["guard_dir"], divergence)
            status(f"[{stage.name}] diverged at {divergence.describe()}")
        logger.close()
        return
    if start >= min(stop_at, stage.total_steps):
        # Nothing left to train (e.g. a Tune trial restarted after its run had finished): report once anyway,
        # so the caller sees the final metrics, and register the product if this run has no checkpoint yet.
        report(start, last_metrics, ray.train.get_checkpoint() is None)
    logger.close()
