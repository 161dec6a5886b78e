"""Command line: ``hdebm-ray`` / ``python -m hdebm_ray``.

Every command that takes a config resolves it (``--preset``, ``--config``, ``--set``), validates it and checks
its data before Ray starts, so a bad key, value or path fails in a second with a message naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import ConfigError, check_stage, load_config, parse_override, preset_names
from .data import DatasetError
from .eval_features import EvalError


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
    return load_config(args.preset, args.config, overrides)


def prepare_run(cfg) -> None:
    """Checks that need the filesystem, then the resolved config saved next to the run."""
    from .data import check_data_available
    from .storage import check_not_in_job_working_dir, run_dir, write_text

    check_not_in_job_working_dir(cfg)
    check_data_available(cfg)
    write_text(f"{run_dir(cfg)}/config.yaml", cfg.to_yaml())


def cmd_pipeline(args) -> int:
    from .launch import init_ray, run_pipeline
    from .stages import PIPELINE
    from .storage import run_dir

    cfg = resolve(args)
    stages = args.stages.split(",") if args.stages else PIPELINE
    unknown = [s for s in stages if s not in PIPELINE]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; stages are {', '.join(PIPELINE)}")
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    prepare_run(cfg)
    init_ray(cfg)
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
    """The checkpoint a stage starts from: --init-from, else the previous stage of the same run."""
    from .launch import read_pipeline_state
    from .stages import INIT_FROM

    parent = INIT_FROM.get(stage)
    if given or not parent:
        return given
    entry = read_pipeline_state(cfg).get(parent)
    if not entry:
        raise ConfigError(
            f"stage {stage!r} starts from a {parent!r} checkpoint: pass --init-from DIR "
            f"or run the {parent!r} stage of run {cfg.run.name!r} first"
        )
    return entry["checkpoint"]


def cmd_train(args) -> int:
    from .launch import fit_stage, init_ray, print_eval_table, running_eval_pool
    from .storage import run_dir

    cfg = resolve(args)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    check_stage(cfg, args.stage)
    init_from = resolve_init_from(cfg, args.stage, args.init_from)
    prepare_run(cfg)
    init_ray(cfg)
    with running_eval_pool(cfg) as pool:
        out = fit_stage(cfg, args.stage, init_from, eval_pool=pool)
    if pool is not None:
        print_eval_table(run_dir(cfg))
    print(f"\n{args.stage} finished in {run_dir(cfg)}; checkpoint {out['checkpoint']}")
    return 0


def cmd_tune(args) -> int:
    from .tune_run import SweepOptions
    from .tune_space import load_space

    overrides = list(args.set)
    for flag, key in (("workers_per_trial", "ray.num_workers"), ("cpus_per_worker", "ray.cpus_per_worker")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.use_gpu:
        overrides.append("ray.use_gpu=true")
    args.set = overrides
    cfg = resolve(args)
    space = load_space(args.space, cfg)  # checked before anything starts
    if args.metric or args.mode:
        space = dataclasses.replace(space, metric=args.metric or space.metric, mode=args.mode or space.mode)
    opts = SweepOptions(
        name=args.name or f"tune-{cfg.run.name}-{space.stage}",
        samples=args.samples,
        scheduler=args.scheduler,
        search=args.search,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        resume=args.resume,
    )
    if args.dry_run:
        print(f"sweep {opts.name}: stage {space.stage}, {space.metric} ({space.mode}), {opts.samples} sample(s)")
        for p in space.params:
            print(f"  {p.key}: {p.kind} {list(p.args)}")
        return 0
    check_stage(cfg, space.stage)
    init_from = resolve_init_from(cfg, space.stage, args.init_from)
    from .launch import init_ray
    from .tune_run import run_sweep

    prepare_run(cfg)
    init_ray(cfg)
    summary = run_sweep(cfg, space, init_from, opts)
    if summary.get("interrupted"):
        print(f"\nsweep {opts.name} interrupted; its state is saved in")
        print(f"  {summary['sweep_dir']}: re-run the same command with --resume to finish it")
        return 130
    print(f"\nsweep {opts.name}: {summary['num_trials']} trial(s), {summary['num_errors']} error(s)")
    print(f"  best {space.metric} = {summary['best_metric']} with {summary['best_params']}")
    print(f"  best config: {summary['best_config']}  (train --config / pipeline --config accept it)")
    print(f"  all trials:  {summary['trials_csv']}")
    return 0


def checkpoints_to_evaluate(args) -> list[str]:
    """Absolute checkpoint paths: the keys the eval pool writes to eval.jsonl, so neither scores one twice."""
    from pathlib import Path

    from .fid import run_checkpoints

    if args.checkpoint:
        return [str(Path(args.checkpoint).resolve())]
    found = run_checkpoints(str(Path(args.run).resolve()))
    if not found:
        raise ConfigError(f"--run {args.run}: no checkpoints (expected <run>/<stage>/checkpoint_*/meta.json)")
    return found


def cmd_eval(args) -> int:
    """FID / KID of one checkpoint, or of every checkpoint of a run not evaluated yet (results kept per run)."""
    from pathlib import Path

    from .checkpoint import load_config_of
    from .fid import FeatureSpaces, evaluate_checkpoint, evaluated, record
    from .sampling import default_device

    todo = checkpoints_to_evaluate(args)
    spaces = FeatureSpaces(default_device(args.device))
    for ckpt in todo:
        run_location = str(Path(ckpt).resolve().parent.parent)
        weights = None if args.ema is None else ("ema" if args.ema else "raw")
        if not args.force and str(ckpt) in evaluated(run_location, args.protocol, weights):
            print(f"[eval] {ckpt}: already evaluated (see {run_location}/eval.jsonl; --force to redo)")
            continue
        base = load_config_of(ckpt)
        cfg = base.replace(**dict(parse_override(o) for o in args.set)) if args.set else base
        result = evaluate_checkpoint(
            ckpt, spaces(cfg), args.n or cfg.eval.num_samples, seed=args.seed, use_ema=args.ema, protocol=args.protocol
        )
        record(run_location, result)
        print(
            f"[eval] {result['stage']} step {result['step']}: FID {result['fid']:.4g}  KID {result['kid']:.4g}  "
            f"({result['num_samples']} samples, {result['features']} features, {result['weights']} weights, "
            f"{result['protocol']} samples)",
            flush=True,
        )
    return 0


def cmd_dataset_convert(args) -> int:
    from .data import write_parquet_shards

    overrides = [f"data.dataset={args.source}", f"data.path={args.input or ''}"]
    if args.resolution:
        overrides.append(f"data.resolution={args.resolution}")
    if args.channels:
        overrides.append(f"data.channels={args.channels}")
    cfg = load_config(None, None, overrides)
    from .data import build_dataset

    paths = write_parquet_shards(build_dataset(cfg), args.out, args.shard_size)
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


def cmd_sample(args) -> int:
    from .sampling import Sampler, default_device, save_grid

    device = default_device(args.device)
    sampler = Sampler(args.checkpoint, device=device, use_ema=args.ema, protocol=args.protocol)
    out = save_grid(sampler.sample(args.n, seed=args.seed), args.out, sampler.cfg)
    print(f"wrote {args.n} {sampler.stage} samples ({sampler.weights} weights, {sampler.protocol}) to {out}")
    return 0


def cmd_enfe(args) -> int:
    """Equivalent NFE of a checkpoint's sampler (docs/algorithms.md §7); prints one JSON line."""
    import json

    from .enfe import measure_enfe
    from .sampling import default_device

    device = default_device(args.device)
    result = measure_enfe(
        args.checkpoint,
        args.batches,
        args.batch_size,
        args.diffusion_batches,
        device,
        diffusion_steps_timed=args.diffusion_steps_timed,
        reference=args.reference,
    )
    print(
        f"[enfe] {result['stage']}: {result['sample_batch_s'] * 1e3:.1f} ms per batch of {args.batch_size} vs "
        f"{result['diffusion_batch_s'] * 1e3:.1f} ms per {result['diffusion_steps']}-step diffusion batch "
        f"-> ENFE {result['enfe']:.1f}",
        flush=True,
    )
    print(json.dumps(result))
    return 0


def cmd_ood(args) -> int:
    """AUROC of a checkpoint's energy as an out-of-distribution score; prints one JSON line."""
    import json

    from .ood import ood_auroc
    from .sampling import default_device

    device = default_device(args.device)
    result = ood_auroc(args.checkpoint, args.in_source, args.out_source, args.n, device=device)
    print(f"[ood] {result['stage']}: {result['in']} vs {result['out']}: AUROC {result['auroc']:.4f}", flush=True)
    print(json.dumps(result))
    return 0


def cmd_presets(args) -> int:
    for name in preset_names():
        print(name)
    return 0


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Which weights and (baselines) which samples: defaults from eval.use_ema and <stage>.eval_protocol."""
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_true", default=None, help="sample with the EMA weights")
    weights.add_argument("--raw", dest="ema", action="store_false", help="sample with the raw weights")
    p.add_argument(
        "--protocol",
        choices=["buffer", "fresh"],
        help="baselines: the replay buffer's chains at the checkpoint, or fresh chains from chain_init",
    )


def build_parser() -> argparse.ArgumentParser:
    from .stages import STAGES
    from .tune_run import SCHEDULERS, SEARCHERS

    parser = argparse.ArgumentParser(prog="hdebm-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run the stages in order, resuming a run of the same name")
    add_config_args(p)
    p.add_argument("--stages", help="comma-separated subset of the stages, in pipeline order")
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("train", help="run one stage")
    add_config_args(p)
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--init-from", help="checkpoint dir of the previous stage (default: from this run)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep over one stage's config keys")
    add_config_args(p)
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--name", help="sweep name (default tune-<run.name>-<stage>); re-use it with --resume")
    p.add_argument("--samples", type=int, default=8, help="trials (per grid point)")
    p.add_argument("--metric", help="reported metric to optimise (default: the space file's)")
    p.add_argument("--mode", choices=["min", "max"], help="default: the space file's")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="fifo")
    p.add_argument("--search", choices=SEARCHERS, default="random")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: reports before a trial may be stopped")
    p.add_argument("--workers-per-trial", type=int, help="= ray.num_workers for every trial")
    p.add_argument("--cpus-per-worker", type=float, help="= ray.cpus_per_worker")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Train worker")
    p.add_argument("--init-from", help="checkpoint the swept stage starts from (default: from run.name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same --name")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("eval", help="FID / KID of a checkpoint (or of every checkpoint of a run)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="one checkpoint directory")
    which.add_argument("--run", help="a run directory: every checkpoint not evaluated yet")
    p.add_argument("--n", type=int, help="samples per checkpoint (default eval.num_samples)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.features=classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="re-evaluate checkpoints that have a result")
    add_sampler_args(p)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("dataset", help="dataset tools")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    c = dsub.add_parser("convert", help="write parquet shards of encoded images")
    c.add_argument("--source", required=True, choices=["digits", "cifar10", "image_folder", "parquet"])
    c.add_argument("--in", dest="input", help="source folder (cifar10 root, image folder)")
    c.add_argument("--out", required=True, help="output folder for shard-*.parquet")
    c.add_argument("--resolution", type=int)
    c.add_argument("--channels", type=int)
    c.add_argument("--shard-size", type=int, default=10000)
    c.set_defaults(fn=cmd_dataset_convert)

    p = sub.add_parser("sample", help="draw samples from a checkpoint with its stage's sampler")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (checkpoint_*)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    add_sampler_args(p)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("enfe", help="equivalent NFE of a checkpoint's sampler against 1000-step diffusion")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, default=100, help="sampler batches timed (the paper: 100)")
    p.add_argument("--batch-size", type=int, default=32, help="the paper: 32")
    p.add_argument("--diffusion-batches", type=int, help="1000-step diffusion batches timed (default: --batches)")
    p.add_argument(
        "--diffusion-steps-timed",
        type=int,
        help="time this many (a divisor of 1000) of each diffusion batch's steps and scale to 1000 (default: all)",
    )
    p.add_argument("--reference", help="checkpoint whose denoiser is timed (baselines have none of their own)")
    p.add_argument("--device", help="default: cuda if available")
    p.set_defaults(fn=cmd_enfe)

    p = sub.add_parser("ood", help="AUROC of a checkpoint's energy as an out-of-distribution score")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--in", dest="in_source", help="in-distribution images (default: the checkpoint's dataset)")
    p.add_argument(
        "--out", dest="out_source", required=True, help="uniform, gaussian, constant, or a dataset (image_folder:PATH)"
    )
    p.add_argument("--n", type=int, default=2000, help="images per side")
    p.add_argument("--device", help="default: cuda if available")
    p.set_defaults(fn=cmd_ood)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(fn=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DatasetError, EvalError, FileNotFoundError) as e:
        print(f"hdebm-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
