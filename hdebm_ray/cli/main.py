"""The ``hdebm-ray`` command line (also ``python -m hdebm_ray``): training commands here, the offline ones in
``inference.py``.

Every command that takes a config resolves it (``--preset``, ``--config``, ``--set``), validates it and checks
its data before Ray starts, so a bad key, value or path fails in a second with a message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

from ..config import ConfigError, load_config, preset_names, preset_summary
from ..config.show import add_config_parser
from ..data.datasets import DatasetError
from ..distributed.pbt import check_pbt
from ..distributed.ray_compat import UntestedRayError
from ..distributed.search_space import load_space
from ..distributed.sweep import SCHEDULERS, SEARCHERS, SweepOptions, sweep_dir
from ..evaluation.features import EvalError
from ..evaluation.results import print_eval_table
from ..io.checkpoint import CheckpointError
from ..io.ownership import RunInUse, RunLease, check_private
from ..io.storage import RunStateError, check_run_name, run_dir, write_text
from ..stages import PIPELINE, STAGES
from ..training.guard import GuardStop
from ..training.interrupts import RunStopped, StopRequest
from ..training.pipeline import check_stages, init_checkpoint
from .args import OneLineParser, at_least, checkpoint
from .inference import add_inference_commands
from .preflight import DependencyError, check_dependencies, preflight


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"named preset ({', '.join(preset_names())})")
    p.add_argument("--config", help="YAML file with config sections (over the preset)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted key, e.g. --set stage1.langevin.step_size=1e-3 (repeatable)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def resolve(args) -> object:
    overrides = list(args.set)
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.preset, args.config, overrides)
    check_run_name(cfg.run.name, "config key 'run.name'")
    return cfg


def prepare_run(cfg, location: str | None = None) -> None:
    """The resolved config saved in the folder this driver owns (after ``owned_run``): the run's, or a sweep's."""
    write_text(f"{location or run_dir(cfg)}/config.yaml", cfg.to_yaml())


@contextlib.contextmanager
def owned_run(location: str, lease_s: float, what: str = "run"):
    """This driver as the run's one owner for the block (``RunInUse`` if another live driver is). The block calls
    the yielded ``stop_on_sigterm()`` once Ray is up (Ray's own handler would end the driver at once): from then on
    SIGTERM is a stop request its stages checkpoint on (``StopRequest``)."""
    with RunLease(location, lease_s, what, exit_on_loss=True), contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(StopRequest(location))


def cmd_pipeline(args) -> int:
    cfg = resolve(args)
    stages = args.stages.split(",") if args.stages else None
    check_stages(stages or [])
    preflight(cfg, stages or PIPELINE)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    from ..distributed.cluster import init_ray
    from ..distributed.driver import run_pipeline

    with owned_run(run_dir(cfg), cfg.run.lease_s) as stop_on_sigterm:
        prepare_run(cfg)
        init_ray(cfg)
        stop_on_sigterm()
        state = run_pipeline(cfg, stages)
    print(f"\nResults in {run_dir(cfg)}")
    for stage, entry in state.items():
        print(f"  {stage:10s} checkpoint: {entry['checkpoint']}")
        if entry.get("samples"):
            print(f"  {'':10s} samples:    {entry['samples']}")
        for k, v in (entry.get("summary") or {}).items():
            print(f"  {'':10s} {k}: {v}")
    print(f"  TensorBoard: tensorboard --logdir {run_dir(cfg)}/tb")
    return 0


def resolve_init_from(cfg, stage: str, given: str | None) -> str | None:
    """The checkpoint a stage starts from: --init-from, else the stage it starts from in the same run."""
    return given or init_checkpoint(cfg, stage)


def cmd_train(args) -> int:
    cfg = resolve(args)
    init_from = resolve_init_from(cfg, args.stage, args.init_from)
    preflight(cfg, [args.stage], {args.stage: init_from})
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    from ..distributed.cluster import init_ray
    from ..distributed.driver import fit_stage, running_eval_pool

    with owned_run(run_dir(cfg), cfg.run.lease_s) as stop_on_sigterm:
        prepare_run(cfg)
        init_ray(cfg)
        stop_on_sigterm()
        with running_eval_pool(cfg) as pool:
            out = fit_stage(cfg, args.stage, init_from, eval_pool=pool)
    if pool is not None:
        print_eval_table(run_dir(cfg))
    print(f"\n{args.stage} finished in {run_dir(cfg)}; checkpoint {out.checkpoint}")
    return 0


def cmd_tune(args) -> int:
    overrides = list(args.set)
    for flag, key in (("workers_per_trial", "ray.num_workers"), ("cpus_per_worker", "ray.cpus_per_worker")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.use_gpu:
        overrides.append("ray.use_gpu=true")
    args.set = overrides
    cfg = resolve(args)
    space = load_space(args.space, cfg, args.metric)  # checked before anything starts
    if args.mode:
        space = dataclasses.replace(space, mode=args.mode)
    if args.scheduler == "pbt":
        check_pbt(space, args.search)
    if args.name:
        check_run_name(args.name, "--name")
    opts = SweepOptions(
        name=args.name or f"tune-{cfg.run.name}-{space.stage}",
        samples=args.samples,
        scheduler=args.scheduler,
        search=args.search,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        resume=args.resume,
        pbt_interval=args.pbt_interval or 0,
    )
    location = sweep_dir(cfg, opts.name)
    if opts.resume:  # Tune unpickles the sweep's saved state in this process
        check_private(location, "tune --resume")
    init_from = resolve_init_from(cfg, space.stage, args.init_from)
    preflight(cfg, [space.stage], {space.stage: init_from}, opts.max_concurrent, run_location=location)
    if args.dry_run:
        print(f"sweep {opts.name}: stage {space.stage}, {space.metric} ({space.mode}), {opts.samples} sample(s)")
        for p in space.params:
            print(f"  {p.key}: {p.kind} {list(p.args)}")
        return 0
    from ..distributed.cluster import init_ray
    from ..distributed.sweep import run_sweep

    with owned_run(location, cfg.run.lease_s, what="sweep"):
        prepare_run(cfg, location)  # never into run.name's folder: a run of that name may be going
        # each running trial: its workers and eval actors, and its driver function's own bundle
        init_ray(cfg, concurrent_runs=opts.max_concurrent, extra_cpus=opts.max_concurrent * opts.trial_driver_cpus)
        summary = run_sweep(cfg, space, init_from, opts)
    if summary.get("interrupted"):
        print(f"\nsweep {opts.name} interrupted; its state is saved in")
        print(f"  {summary['sweep_dir']}: re-run the same command with --resume to finish it")
        return 130
    print(f"\nsweep {opts.name}: {summary['num_trials']} trial(s), {summary['num_errors']} error(s)")
    print(f"  best {space.metric} = {summary['best_metric']} with {summary['best_params']}")
    # the best config trains on from the sweep's own starting checkpoint: say so, or the command would be refused
    start = f" --init-from {init_from}" if init_from else ""
    print(f"  best config: {summary['best_config']}")
    print(f"    train it:  hdebm-ray train --stage {space.stage} --config {summary['best_config']}{start}")
    print(f"  all trials:  {summary['trials_csv']}")
    return 0


def cmd_presets(args) -> int:
    """Each shipped preset with the first sentence of its description (the comment its file opens with)."""
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}}  {preset_summary(name)}")
    return 0


DESCRIPTION = (
    "Train energy-based image generators (HDEBM and its baselines) on Ray: pipeline / train / tune start Ray (an "
    "embedded one, or $RAY_ADDRESS); eval / sample / enfe / ood / dataset read checkpoints and data without it."
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hdebm-ray", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run the stages in order, resuming a run of the same name")
    add_config_args(p)
    p.add_argument("--stages", help="comma-separated subset of the stages, in pipeline order")
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("train", help="run one stage")
    add_config_args(p)
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--init-from", type=checkpoint, help="checkpoint dir of the previous stage (default: from this run)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep over one stage's config keys")
    add_config_args(p)
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--name", help="sweep name (default tune-<run.name>-<stage>); re-use it with --resume")
    p.add_argument("--samples", type=at_least(1), default=8, help="trials (per grid point)")
    p.add_argument("--metric", help="reported metric to optimise (default: the space file's)")
    p.add_argument("--mode", choices=["min", "max"], help="default: the space file's")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="fifo")
    p.add_argument("--search", choices=SEARCHERS, default="random")
    p.add_argument("--max-concurrent", type=at_least(1), default=1, help="trials running at once")
    p.add_argument("--grace-period", type=at_least(1), default=1, help="ASHA: reports before a trial may be stopped")
    p.add_argument(
        "--pbt-interval",
        type=at_least(1),
        help="PBT: steps between perturbations (default: checkpoint_every)",
    )
    p.add_argument("--workers-per-trial", type=at_least(1), help="= ray.num_workers for every trial")
    p.add_argument("--cpus-per-worker", type=at_least(0.01, float), help="= ray.cpus_per_worker")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Train worker")
    p.add_argument(
        "--init-from", type=checkpoint, help="checkpoint the swept stage starts from (default: from run.name)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same --name")
    p.set_defaults(fn=cmd_tune)

    add_inference_commands(sub)

    p = sub.add_parser("presets", help="list the shipped presets and what each is")
    p.set_defaults(fn=cmd_presets)
    add_config_parser(sub)
    return parser


USER_ERRORS = (
    CheckpointError,
    ConfigError,
    DatasetError,
    EvalError,
    FileNotFoundError,
    FileExistsError,
    UntestedRayError,
    RunInUse,
    RunStateError,
    DependencyError,
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_dependencies()
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"hdebm-ray: error: {e}", file=sys.stderr)
        return 2
    except GuardStop as e:  # diverged past guard.max_rollbacks: the message says where; the checkpoints stay
        print(f"hdebm-ray: stopped: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:  # SIGTERM: every rank checkpointed at its step; the same command resumes
        print(f"hdebm-ray: stopped: {e}", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
