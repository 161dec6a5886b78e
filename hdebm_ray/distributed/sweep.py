"""Ray Tune sweeps over one stage (Train V2 pattern): each trial is a driver function that fits a TorchTrainer
(with ``--scheduler pbt``, a sequence of them: ``pbt.py``).

Layout under ``<run.storage_path>/<sweep>/``: Tune's experiment (trial dirs with ``result.json``, ``progress.csv``
and TensorBoard events with HParams), ``trials/trial-<id>/<stage>/`` (each trial's Train run: checkpoints, bank
snapshots, its own TensorBoard), and when the sweep ends ``trials.csv`` (every trial: parameters, last metrics,
status) and ``best_config.yaml`` (the best trial's resolved config; ``train --config`` / ``pipeline --config``
accept it). Each trial gets its own bank actor, named by the trial's run name, killed when its Train run ends.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from dataclasses import dataclass

from ..config import Config, ConfigError, from_dict
from ..io import storage
from ..io.software import software_fingerprint
from ..io.storage import run_dir
from ..stages import stage_class
from .pbt import check_pbt, make_pbt_trainable, pbt_scheduler
from .ray_compat import wait_for_forwarded_reports
from .search_space import SearchSpace, trial_config

SEARCHERS = ("random", "optuna", "hyperopt")
SCHEDULERS = ("fifo", "asha", "pbt")


@dataclass(frozen=True)
class SweepOptions:
    name: str
    samples: int = 8
    scheduler: str = "fifo"
    search: str = "random"
    max_concurrent: int = 1
    grace_period: int = 1  # ASHA: reports before a trial can first be stopped
    reduction_factor: int = 2
    trial_driver_cpus: float = 0.1  # the driver function only waits on its TorchTrainer
    resume: bool = False
    pbt_interval: int = 0  # PBT: steps between perturbations (each a chunk of the stage); 0 = its checkpoint_every
    quantile_fraction: float = 0.25  # PBT: the bottom fraction cloned from the top fraction at each perturbation
    resample_probability: float = 0.25  # PBT: chance that an explored value is redrawn instead of scaled


def sweep_dir(cfg: Config, name: str) -> str:
    """``<run.storage_path>/<sweep name>``: the Tune experiment and its trials' runs."""
    return run_dir(cfg.replace(**{"run.name": name}))


def reports_per_trial(cfg: Config, stage: str) -> int:
    cls = stage_class(stage)
    return max(1, math.ceil(cls.length(cfg) / cls.section(cfg).report_every))


def make_trainable(base: Config, stage: str, init_from: str | None, sweep_location: str):
    base_tree = base.to_dict()
    software = software_fingerprint()  # the CLI's: a trial's driver runs on whichever node Tune placed it

    def train_trial(params: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from .driver import fit_stage, running_eval_pool

        cfg = trial_config(from_dict(base_tree), params, sweep_location, tune.get_context().get_trial_id())
        # Same Train run name on a retried or resumed trial: the Train run resumes from its own checkpoint.
        # With eval.actors > 0 the trial has its own eval pool, whose newest Eval/fid rides on the reports.
        with running_eval_pool(cfg, software=software) as pool:
            out = fit_stage(cfg, stage, init_from, callbacks=[TuneReportCallback()], eval_pool=pool, software=software)
            wait_for_forwarded_reports()
            if pool is not None and stage in cfg.eval.stages:
                report_final_score(pool, stage, out, cfg.eval.drain_timeout_s)

    return train_trial


def report_final_score(pool, stage: str, out, wait_s: float) -> None:
    """Report the stage's last metrics once more, with the final checkpoint's FID in ``Eval/fid``.

    The final checkpoint is scored after the stage's last report, so without this a trial's last ``Eval/fid``
    belongs to an earlier checkpoint (or is NaN in a short trial), and Tune ranks trials by their last report.
    Waits for the trial's pool to finish (at most ``wait_s``); a final checkpoint the pool could not score adds nothing.
    """
    import ray
    from ray import tune

    ray.get(pool.drain.remote(wait_s), timeout=wait_s + 60)
    latest = ray.get(pool.latest.remote(stage), timeout=60)
    if latest is None or latest["step"] != out.step:
        return
    tune.report({**out.last_report, "Eval/fid": float(latest["fid"]), "Eval/fid_step": float(latest["step"])})


def _search_alg(space: SearchSpace, opts: SweepOptions, seed: int):
    if opts.search == "random":
        from ray.tune.search import BasicVariantGenerator

        # seeded by run.seed: the same sweep samples the same trials (a PBT and a random sweep start alike)
        # It takes the concurrency limit itself: Tune ignores max_concurrent_trials beside a SearchGenerator
        return BasicVariantGenerator(max_concurrent=opts.max_concurrent, random_state=seed)
    if any(p.kind == "grid" for p in space.params):
        raise ConfigError(f"--search {opts.search}: 'grid' distributions only work with --search random")
    try:
        if opts.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            alg = OptunaSearch(metric=space.metric, mode=space.mode)
        else:
            from ray.tune.search.hyperopt import HyperOptSearch

            alg = HyperOptSearch(metric=space.metric, mode=space.mode)
    except (ImportError, AssertionError) as err:
        raise ConfigError(
            f"--search {opts.search} needs the '{opts.search}' package: pip install 'hdebm_ray[tune-search]' ({err})"
        ) from err
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(alg, max_concurrent=opts.max_concurrent)


def _scheduler(space: SearchSpace, opts: SweepOptions, max_reports: int):
    if opts.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t well above the reports per trial (a restarted Train run reports some steps twice): ASHA stops
    # trials that reach max_t, which would cut a Train run off before its final checkpoint.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=2 * max_reports,
        grace_period=min(opts.grace_period, max_reports),
        reduction_factor=opts.reduction_factor,
    )


def pbt_interval(base: Config, stage: str, opts: SweepOptions) -> int:
    return opts.pbt_interval or getattr(base, stage).checkpoint_every


def build_tuner(base: Config, space: SearchSpace, init_from: str | None, opts: SweepOptions):
    from ray import tune

    location = sweep_dir(base, opts.name)
    pbt = opts.scheduler == "pbt"
    if pbt:
        check_pbt(space, opts.search)
        interval = pbt_interval(base, space.stage, opts)
        trainable = make_pbt_trainable(base, space.stage, init_from, location, interval)
    else:
        trainable = make_trainable(base, space.stage, init_from, location)
    trainable = tune.with_resources(trainable, {"CPU": opts.trial_driver_cpus})
    if opts.resume:
        if not tune.Tuner.can_restore(location):
            raise ConfigError(f"--resume: no sweep to resume at {location}")
        return tune.Tuner.restore(location, trainable, resume_unfinished=True, resume_errored=True)
    max_reports = reports_per_trial(base, space.stage)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=opts.samples,
            scheduler=(
                pbt_scheduler(space, interval, opts.quantile_fraction, opts.resample_probability)
                if pbt
                else _scheduler(space, opts, max_reports)
            ),
            search_alg=_search_alg(space, opts, base.run.seed),
            max_concurrent_trials=opts.max_concurrent,
            # PBT pauses and restarts every trial at each perturbation: reuse the trial processes
            reuse_actors=pbt,
        ),
        run_config=tune.RunConfig(
            name=opts.name,
            storage_path=location.rsplit("/", 1)[0],
            failure_config=tune.FailureConfig(max_failures=1),
            # PBT clones from a trial's latest checkpoint: keep a few (two or fewer and PBT warns that a donor's may
            # be gone before it is copied)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if pbt else None),
        ),
    )


def write_outputs(results, base: Config, space: SearchSpace, opts: SweepOptions) -> dict:
    """trials.csv of every trial and best_config.yaml of the best; returns a summary."""
    location = sweep_dir(base, opts.name)
    frame = results.get_dataframe()
    storage.write_text(f"{location}/trials.csv", frame.to_csv(index=False))
    best = results.get_best_result(metric=space.metric, mode=space.mode, scope="last")
    params = dict(best.config)
    best_cfg = base.replace(**params, **{"run.name": f"{base.run.name}-best"})
    text = f"# best trial of sweep {opts.name!r} ({space.metric} {space.mode}): {params}\n" + best_cfg.to_yaml()
    storage.write_text(f"{location}/best_config.yaml", text)
    return {
        "best_params": params,
        "best_metric": best.metrics.get(space.metric),
        "best_config": f"{location}/best_config.yaml",
        "trials_csv": f"{location}/trials.csv",
        "num_trials": len(frame),
        "num_errors": results.num_errors,
    }


def leftover_bank_actors() -> list[str]:
    """Bank actors still alive in our namespace (``bank-<run id>-<stage>``): after a sweep, none should be."""
    import ray

    from .bank_actor import NAMESPACE

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if re.fullmatch(r"bank-[0-9a-f]{16}-\w+", a["name"]) and a.get("namespace", NAMESPACE) == NAMESPACE
    ]


def _fit_noting_interrupt(tuner) -> tuple[object, bool]:
    """``tuner.fit()``, and whether Ctrl-C interrupted it.

    On SIGINT Tune saves its state, stops the trials and returns normally; its handler then puts back the one it
    replaced, which is how we tell (an interrupted sweep must not be reported as finished).
    """
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def ours(sig, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ours)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(base: Config, space: SearchSpace, init_from: str | None, opts: SweepOptions) -> dict:
    results, interrupted = _fit_noting_interrupt(build_tuner(base, space, init_from, opts))
    if interrupted:  # Tune saved its state for --resume
        return {"interrupted": True, "sweep_dir": sweep_dir(base, opts.name)}
    summary = write_outputs(results, base, space, opts)
    summary["leftover_bank_actors"] = leftover_bank_actors()
    return summary
