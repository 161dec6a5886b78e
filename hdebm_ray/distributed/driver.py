"""The driver side: connect to (or start) Ray, run stages as TorchTrainer jobs, chain them into the pipeline.

The same code path serves an embedded local Ray on a laptop and an existing cluster (``RAY_ADDRESS``,
``--address``, or ``ray job submit``, which sets ``RAY_ADDRESS`` for the entrypoint).
Each stage is one Ray Train run named after the stage under ``<storage_path>/<run.name>/``; re-running with the
same run name resumes every stage from its last registered checkpoint, and finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import json

from ..config import Config
from ..evaluation.results import print_eval_table
from ..io import storage
from ..io.checkpoint import load_meta
from ..io.storage import as_uri, run_dir
from ..stages import BANK_SPECS, INIT_FROM, PIPELINE
from ..training.guard import DIVERGENCE_FILE, GUARDED_STAGES, GuardLog, backed_off, roll_back, take_divergence
from .cluster import resources_needed

NAMESPACE = "hdebm"


def trainer_for(
    cfg: Config,
    stage: str,
    init_from: str | None = None,
    callbacks=(),
    name: str | None = None,
    bank_name: str | None = None,
    report_hooks=(),
    eval_pool: str | None = None,
    guard_log=None,
    resume_from: str | None = None,
    stop_at_step: int | None = None,
):
    """A TorchTrainer that runs ``stage`` with ``cfg.ray.num_workers`` DDP workers (gloo on CPU, nccl on GPU);
    ``guard_log``: the stage's rollbacks so far (``guard.GuardLog``); ``resume_from``: a checkpoint to start from
    when this Train run has none of its own; ``stop_at_step``: end the run there (a PBT chunk)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..stages import STAGES
    from .ray_data import trainer_data
    from .worker import train_loop_per_worker

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    location = run_dir(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "stage": stage,
            "init_from": init_from,
            "log_dir": f"{location}/tb",
            "bank_name": bank_name,
            "eval_pool": eval_pool,  # rank 0 adds the pool's latest Eval/fid to its reports
            # Callables hook(rank=, step=) every rank runs after each report (the tests inject faults with one).
            "report_hooks": list(report_hooks),
            "stage_dir": f"{location}/{name or stage}",  # the Train run's directory
            "guard_dir": f"{location}/{stage}",  # the guard's files: one log for all of a PBT trial's chunks
            "guard_rollbacks": guard_log.rollbacks if guard_log is not None else [],
            "resume_from": resume_from,
            "stop_at_step": stop_at_step,
        },
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker=resources,
            placement_strategy=r.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or stage,
            storage_path=location,
            checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        **trainer_data(cfg, STAGES[stage].data_streams),
    )


def read_pipeline_state(cfg: Config) -> dict:
    path = f"{run_dir(cfg)}/pipeline.json"
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def _write_pipeline_state(cfg: Config, state: dict) -> None:
    storage.write_text(f"{run_dir(cfg)}/pipeline.json", json.dumps(state, indent=2))


def _finished(entry: dict | None) -> bool:
    if not entry:
        return False
    try:
        return bool(load_meta(entry["checkpoint"]).get("done"))
    except FileNotFoundError:
        return False


def bank_actor_name(cfg: Config, stage: str) -> str:
    return f"bank-{cfg.run.name}-{stage}"


def start_bank(cfg: Config, stage: str, train_name: str | None = None):
    """Create the stage's bank actor (or find the one a previous attempt left); None if the stage has none. Its
    snapshots go beside the Train run's checkpoints (``<run>/<train_name or stage>/bank``)."""
    if stage not in BANK_SPECS:
        return None
    from .bank_actor import create_bank_actor

    return create_bank_actor(
        bank_actor_name(cfg, stage),
        **BANK_SPECS[stage](cfg),
        snapshot_dir=f"{run_dir(cfg)}/{train_name or stage}/bank",
        seed=cfg.run.seed,
        keep=cfg.ray.checkpoints_to_keep + 1,
    )


def fit_stage(
    cfg: Config,
    stage: str,
    init_from: str | None = None,
    callbacks=(),
    report_hooks=(),
    eval_pool=None,
    chunk: dict | None = None,
) -> dict:
    """Run one stage to its end (resuming if it ran before); returns {checkpoint, step, summary, last_report}
    (``last_report``: rank 0's last reported metrics).

    With ``eval_pool`` (a running ``EvalPool``) and ``stage`` in ``eval.stages``, every checkpoint the run
    registers is handed to the pool as it lands; the pool's results do not hold the stage up. ``chunk`` (a PBT
    trial's part of the stage): ``{"train_name": its own Train run, "resume_from": checkpoint or None,
    "stop_at_step": int}``.
    """
    from ..data.datasets import build_dataset
    from ..stages import STAGES
    from ..stages.hdebm_stage2 import follow_stage1_chain
    from .eval_pool import NotifyEvalPool, pool_name
    from .ray_data import check_stream_fits, uses_ray_data

    if uses_ray_data(cfg):
        section, n = getattr(cfg, STAGES[stage].section_name or stage), len(build_dataset(cfg))
        for batch in (section.batch_size, getattr(section, "classifier_batch_size", 0)):
            check_stream_fits(cfg, n, batch)
    pool = pool_name(cfg) if eval_pool is not None and stage in cfg.eval.stages else None
    if pool is not None:
        callbacks = [*callbacks, NotifyEvalPool(pool, stage, run_dir(cfg))]
    # The divergence guard: an attempt that diverged stops early; roll back (resume from the newest checkpoint,
    # the last good one) with the stage's step sizes / LRs backed off, until it ends or GuardStop.
    chunk = chunk or {}
    # The guard's log is the stage's, across a PBT trial's chunks (its backoff and max_rollbacks hold for all).
    stage_dir, log = f"{run_dir(cfg)}/{stage}", None
    train_dir = f"{run_dir(cfg)}/{chunk.get('train_name') or stage}"
    start = int(load_meta(chunk["resume_from"])["step"]) if chunk.get("resume_from") else 0
    if stage in GUARDED_STAGES:
        log = GuardLog.read(cfg, stage_dir)
    cfg, followed = follow_stage1_chain(cfg, stage, init_from)
    if followed:
        print(followed, flush=True)
    while True:
        # first pass: a divergence left by an attempt whose driver died before it rolled back
        if log is not None and (divergence := take_divergence(stage_dir)) is not None:
            to_step = max(start, _latest_step(train_dir))  # what the next attempt resumes from
            print(roll_back(cfg, stage, stage_dir, log, divergence, to_step), flush=True)
        attempt_cfg = backed_off(cfg, stage, log) if log is not None else cfg
        result = _fit_attempt(attempt_cfg, stage, init_from, callbacks, report_hooks, pool, log, chunk)
        if log is None or not storage.exists(f"{stage_dir}/{DIVERGENCE_FILE}"):
            break
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage!r} finished without registering a checkpoint")
    path = as_uri(result.checkpoint.path, run_dir(cfg))
    meta = load_meta(path)
    summary = meta.get("summary", {})
    return {"checkpoint": path, "step": meta.get("step"), "summary": summary, "last_report": dict(result.metrics or {})}


def _fit_attempt(cfg: Config, stage: str, init_from, callbacks, report_hooks, pool, guard_log, chunk: dict):
    """One TorchTrainer run of the stage (with its bank actor, killed afterwards): to the end, or to the step
    where the guard stopped it."""
    from ..data.files import DatasetError
    from .ray_data import data_error_in

    bank = start_bank(cfg, stage, chunk.get("train_name"))
    name = bank_actor_name(cfg, stage) if bank is not None else None
    try:
        trainer = trainer_for(
            cfg,
            stage,
            init_from,
            callbacks,
            name=chunk.get("train_name"),
            bank_name=name,
            report_hooks=report_hooks,
            eval_pool=pool,
            guard_log=guard_log,
            resume_from=chunk.get("resume_from"),
            stop_at_step=chunk.get("stop_at_step"),
        )
        try:
            return trainer.fit()
        except Exception as e:  # a bad file met by a worker or a Ray Data task: the user's, named in one line
            if (message := data_error_in(e)) is not None:
                raise DatasetError(message) from None
            raise
    finally:
        if bank is not None:
            from .bank_actor import kill_bank

            kill_bank(bank, name)


def _latest_step(stage_dir: str) -> int:
    """The step of the stage's newest complete checkpoint (what the next attempt resumes from), 0 if none."""
    from ..io.checkpoint import run_checkpoints

    run_location, stage = stage_dir.rsplit("/", 1)
    return max([0] + [int(load_meta(p)["step"]) for p in run_checkpoints(run_location, [stage])])


@contextlib.contextmanager
def running_eval_pool(cfg: Config, **testing):
    """The run's eval pool for the duration of the block (None if ``eval.actors`` is 0).

    On a normal exit the block waits for the queued evaluations and prints them; on an error or Ctrl-C the pool
    is killed at once (a later run of the same name scores what it missed).
    """
    import ray

    from .eval_pool import create_eval_pool, shutdown_pool

    pool = create_eval_pool(cfg, run_dir(cfg), **testing)
    if pool is None:
        yield None
        return
    _warn_if_pool_starves_workers(cfg)
    try:
        yield pool
        pending = ray.get(pool.status.remote())
        if pending["queued"] or pending["running"]:
            print(f"[eval] waiting for {pending['queued'] + pending['running']} evaluation(s)", flush=True)
        summary = ray.get(pool.drain.remote())
        for failure in summary["failures"]:
            print(f"[eval] not scored: {failure['checkpoint']}", flush=True)
    finally:
        shutdown_pool(pool)


def write_sample_grid(cfg: Config, checkpoint: str, out: str, n: int = 64) -> str:
    """Sample a stage's checkpoint with its own sampler in a Ray task on a worker-sized slot; write a PNG (upscaled,
    captioned with what it shows: ``Sampler.caption``)."""
    import ray

    @ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)
    def grid(ckpt: str, path: str) -> str:
        from ..evaluation.sampling import Sampler, default_device, save_grid
        from ..io.storage import local_dir, staged_output

        out_dir, name = path.rsplit("/", 1)
        with local_dir(ckpt) as d, staged_output(out_dir) as local_out:
            sampler = Sampler(d, device=default_device(), origin=ckpt)
            save_grid(sampler.sample(n), local_out / name, sampler.cfg, caption=sampler.caption())
        return path

    return ray.get(grid.remote(checkpoint, out))


def run_pipeline(cfg: Config, stages: list[str] | None = None) -> dict:
    """Run the stages in order, each from the previous one's final checkpoint; skips finished stages."""
    with running_eval_pool(cfg) as pool:
        state = _run_stages(cfg, stages or PIPELINE, pool)
    if cfg.eval.actors:
        print_eval_table(run_dir(cfg))
    return state


def _run_stages(cfg: Config, stages: list[str], eval_pool) -> dict:
    state = read_pipeline_state(cfg)
    for stage in stages:
        if _finished(state.get(stage)):
            print(f"[pipeline] {stage}: already finished at {state[stage]['checkpoint']}", flush=True)
            continue
        parent = INIT_FROM.get(stage)
        init_from = None
        if parent is not None:
            if not _finished(state.get(parent)):
                raise RuntimeError(f"stage {stage!r} needs a finished {parent!r} stage in {run_dir(cfg)}")
            init_from = state[parent]["checkpoint"]
        print(f"[pipeline] {stage}: starting" + (f" from {init_from}" if init_from else ""), flush=True)
        out = fit_stage(cfg, stage, init_from, eval_pool=eval_pool)
        state[stage] = {key: out[key] for key in ("checkpoint", "step", "summary")}
        state[stage]["samples"] = write_sample_grid(
            cfg, state[stage]["checkpoint"], f"{run_dir(cfg)}/samples/{stage}.png"
        )
        _write_pipeline_state(cfg, state)
        print(f"[pipeline] {stage}: done -> {state[stage]['checkpoint']}", flush=True)
    return state


def _warn_if_pool_starves_workers(cfg: Config) -> None:
    """Eval actors hold their CPUs/GPUs for the whole run: on a cluster that cannot fit them next to the workers,
    a stage's worker group would wait forever (unless an autoscaler adds nodes)."""
    import ray

    e, total = cfg.eval, ray.cluster_resources()
    for res, need in resources_needed(cfg).items():
        if need > total.get(res, 0.0) + 1e-9:
            print(
                f"[eval] warning: the workers and {e.actors} eval actor(s) need {need:g} {res} but the cluster has "
                f"{total.get(res, 0.0):g}; without an autoscaler the workers will wait for the eval actors. Lower "
                f"eval.actors / eval.cpus_per_actor / eval.gpus_per_actor or ray.num_workers.",
                flush=True,
            )
