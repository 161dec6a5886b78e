"""The driver side of a stage on Ray: each attempt of ``training.session.fit_with_rollbacks`` is one TorchTrainer run
(with the stage's bank actor, and the eval pool's callback), and ``training.pipeline`` chains the stages with it.

The same code path serves an embedded local Ray on a laptop and an existing cluster (``RAY_ADDRESS``, ``--address``,
or ``ray job submit``, which sets ``RAY_ADDRESS`` for the entrypoint; ``cluster.py``). Each stage is one Ray Train
run named after the stage under ``<storage_path>/<run.name>/``; re-running with the same run name resumes every
stage from its last registered checkpoint, and finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import functools

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import Config, ConfigError
from ..data.datasets import build_dataset
from ..data.files import DatasetError
from ..evaluation.images import save_grid
from ..evaluation.results import print_eval_table
from ..evaluation.sampling import Sampler, default_device
from ..io.checkpoint import load_meta
from ..io.ownership import StorageNotShared, run_id, run_identity
from ..io.software import SoftwareMismatch, software_fingerprint
from ..io.storage import as_uri, local_dir, run_dir, staged_output
from ..stages import stage_class
from ..training.interrupts import STOP_FILE, RunStopped, stop_requested
from ..training.pipeline import run_pipeline as run_stages
from ..training.session import Chunk, StageJob, StageResult, fit_with_rollbacks
from .bank_actor import create_bank_actor, kill_bank
from .cluster import stable_placement, warn_if_pool_starves_workers
from .eval_pool import NotifyEvalPool, create_eval_pool, pool_name, shutdown_pool
from .ray_data import check_stream_fits, data_error_in, trainer_data, uses_ray_data
from .worker import WorkerJob, train_loop_per_worker


def trainer_for(cfg: Config, work: WorkerJob, train_name: str, callbacks=(), keep_all: bool = False) -> TorchTrainer:
    """A TorchTrainer running ``work`` on ``cfg.ray.num_workers`` DDP workers (gloo on CPU, nccl on GPU), as the
    Train run ``train_name`` of the run. ``keep_all``: Ray removes no checkpoint (the eval pool does, once scored).

    Preemptions have their own budget (``ray.max_preemption_failures``); the collectives time out after
    ``ray.collective_timeout_s``; with ``ray.elastic_min_workers`` the group restarts on fewer nodes."""
    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    workers = (r.elastic_min_workers, r.num_workers) if r.elastic_min_workers else r.num_workers
    return TorchTrainer(
        functools.partial(train_loop_per_worker, work),
        torch_config=TorchConfig(timeout_s=int(r.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=r.use_gpu,
            resources_per_worker=resources,
            placement_strategy=r.placement_strategy,
        ),
        run_config=RunConfig(
            name=train_name,
            storage_path=run_dir(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all else r.checkpoints_to_keep),
            failure_config=FailureConfig(
                max_failures=r.max_failures,
                max_preemption_failures=r.max_preemption_failures,
                preemption_grace_s=r.preemption_grace_s,
            ),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        **trainer_data(cfg, stage_class(work.job.stage).data_streams),
    )


def bank_actor_name(cfg: Config, stage: str) -> str:
    return f"bank-{run_id(run_dir(cfg))}-{stage}"


def start_bank(cfg: Config, stage: str, train_name: str | None = None):
    """Create the stage's bank actor (or find the one a previous attempt left); None if the stage has none. Its
    snapshots go beside the Train run's checkpoints (``<run>/<train_name or stage>/bank``); it is placed off spot
    nodes where the cluster says which, with memory for its store reserved."""
    spec = stage_class(stage).bank_spec(cfg)
    if spec is None:
        return None
    return create_bank_actor(
        bank_actor_name(cfg, stage),
        **spec.arguments(),
        snapshot_dir=f"{run_dir(cfg)}/{train_name or stage}/bank",
        seed=cfg.run.seed,
        keep=cfg.ray.checkpoints_to_keep + 1,
        run=run_identity(run_dir(cfg)),
        placement=stable_placement(int(1.3 * spec.nbytes())),
    )


def fit_stage(
    cfg: Config,
    stage: str,
    init_from: str | None = None,
    callbacks=(),
    report_hooks=(),
    eval_pool=None,
    chunk: Chunk | None = None,
    software: dict | None = None,
) -> StageResult:
    """Run one stage to its end on Ray (resuming if it ran before; rolling back on a divergence).

    With ``eval_pool`` (a running ``EvalPool``) and ``stage`` in ``eval.stages``, every checkpoint the run
    registers is handed to the pool as it lands; the pool's results do not hold the stage up. ``chunk``: a PBT
    trial's part of the stage, its own Train run. ``software``: the fingerprint every worker must match (this
    process's by default; a Tune trial's driver, itself on some node, is handed the CLI's).
    """
    if uses_ray_data(cfg):
        section, n = stage_class(stage).section(cfg), len(build_dataset(cfg))
        for batch in (section.batch_size, getattr(section, "classifier_batch_size", 0)):
            check_stream_fits(cfg, n, batch)
    location = run_dir(cfg)
    pool = pool_name(cfg) if eval_pool is not None and stage in cfg.eval.stages else None
    if pool is not None:
        callbacks = [*callbacks, NotifyEvalPool(pool, stage, location)]
    train_name = chunk.train_name if chunk is not None else stage
    stage_dir, guard_dir = f"{location}/{train_name}", f"{location}/{stage}"
    software = software or software_fingerprint()  # once: every attempt's workers are held to the same

    def attempt(attempt_cfg: Config, rollbacks: tuple[dict, ...]):
        job = StageJob(
            attempt_cfg,
            stage,
            stage_dir=stage_dir,
            guard_dir=guard_dir,  # one guard log for all of a PBT trial's chunks
            log_dir=f"{location}/tb",
            init_from=init_from,
            resume_from=chunk.resume_from if chunk is not None else None,
            stop_at_step=chunk.stop_at_step if chunk is not None else None,
            rollbacks=rollbacks,
            stop_file=f"{location}/{STOP_FILE}",
        )
        return _fit_attempt(attempt_cfg, job, train_name, callbacks, tuple(report_hooks), pool, software)

    # a chunk resumes from its donor's checkpoint until it has one of its own
    resumes_at = int(load_meta(chunk.resume_from)["step"]) if chunk is not None and chunk.resume_from else 0
    result = fit_with_rollbacks(cfg, stage, init_from, stage_dir, guard_dir, attempt, resumes_at)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage!r} finished without registering a checkpoint")
    out = StageResult.of(as_uri(result.checkpoint.path, location), dict(result.metrics or {}))
    if (reason := stop_requested(f"{location}/{STOP_FILE}")) is not None and not load_meta(out.checkpoint)["done"]:
        raise RunStopped(
            f"stage {stage} stopped on {reason} after a checkpoint at step {out.step} ({out.checkpoint}); the same "
            "command resumes the run from there"
        )
    return out


def _fit_attempt(cfg: Config, job: StageJob, train_name: str, callbacks, report_hooks, pool, software: dict):
    """One TorchTrainer run of the stage (with its bank actor, killed afterwards): to the end, or to the step
    where the guard stopped it."""
    bank = start_bank(cfg, job.stage, train_name if train_name != job.stage else None)
    name = bank_actor_name(cfg, job.stage) if bank is not None else None
    run = run_identity(run_dir(cfg))
    work = WorkerJob(
        job,
        bank_actor=name,
        eval_pool=pool,
        report_hooks=report_hooks,
        run=run,
        software=software,
    )
    try:
        try:
            return trainer_for(cfg, work, train_name, callbacks, keep_all=pool is not None).fit()
        except Exception as e:  # a bad file met by a worker or a Ray Data task: the user's, named in one line
            if (message := data_error_in(e)) is not None:
                raise DatasetError(message) from None
            for kind in (StorageNotShared, SoftwareMismatch):
                if (message := data_error_in(e, kind)) is not None:
                    raise ConfigError(message) from None
            raise
    finally:
        if bank is not None:
            kill_bank(bank, name)


@contextlib.contextmanager
def running_eval_pool(cfg: Config, software: dict | None = None, **testing):
    """The run's eval pool for the duration of the block (None if ``eval.actors`` is 0); ``software`` as for
    ``create_eval_pool``.

    On a normal exit the block waits for the queued evaluations and prints them; on an error or Ctrl-C the pool
    is killed at once (a later run of the same name scores what it missed).
    """
    pool = create_eval_pool(cfg, run_dir(cfg), software=software, **testing)
    if pool is None:
        yield None
        return
    warn_if_pool_starves_workers(cfg)
    try:
        yield pool
        wait_s = cfg.eval.drain_timeout_s
        pending = ray.get(pool.status.remote(), timeout=60)
        if pending["queued"] or pending["running"]:
            n = pending["queued"] + pending["running"]
            print(f"[eval] waiting for {n} evaluation(s), at most eval.drain_timeout_s = {wait_s:g} s", flush=True)
        summary = ray.get(pool.drain.remote(wait_s), timeout=wait_s + 60)
        for failure in summary["failures"]:
            print(f"[eval] not scored: {failure['checkpoint']}: {failure['reason']}", flush=True)
        for ckpt in summary["left"]:
            print(f"[eval] not scored in time: {ckpt} (hdebm-ray eval --run scores it later)", flush=True)
    finally:
        shutdown_pool(pool)


def write_sample_grid(cfg: Config, checkpoint: str, out: str, n: int = 64) -> str:
    """Sample a stage's checkpoint with its own sampler in a Ray task on a worker-sized slot; write a PNG (upscaled,
    captioned with what it shows: ``Sampler.caption``)."""

    @ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)
    def grid(ckpt: str, path: str) -> str:
        out_dir, name = path.rsplit("/", 1)
        with local_dir(ckpt) as d, staged_output(out_dir) as local_out:
            sampler = Sampler(d, device=default_device(), origin=ckpt)
            save_grid(sampler.sample(n), local_out / name, sampler.cfg, caption=sampler.caption())
        return path

    return ray.get(grid.remote(checkpoint, out), timeout=cfg.eval.timeout_s)


def run_pipeline(cfg: Config, stages: list[str] | None = None) -> dict:
    """HDEBM's stages on Ray, in order (``training.pipeline``), with the run's eval pool and a sample grid of each
    finished stage."""
    location = run_dir(cfg)
    with running_eval_pool(cfg) as pool:

        def fit(stage_cfg: Config, stage: str, init_from: str | None) -> StageResult:
            if (reason := stop_requested(f"{location}/{STOP_FILE}")) is not None:
                raise RunStopped(f"stopped on {reason} before stage {stage}; the same command resumes the run")
            return fit_stage(stage_cfg, stage, init_from, eval_pool=pool)

        def grid(stage: str, result: StageResult) -> dict:
            return {"samples": write_sample_grid(cfg, result.checkpoint, f"{location}/samples/{stage}.png")}

        state = run_stages(cfg, fit, stages, after_stage=grid)
    if cfg.eval.actors:
        print_eval_table(location)
    return state
