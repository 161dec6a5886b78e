"""The offline commands of ``hdebm-ray`` that read checkpoints rather than train: ``eval`` (FID / KID),
``sample``, ``enfe``, ``ood``, and ``dataset convert``. None of them needs Ray. Their long loops show progress
(``hdebm_ray.progress``: a bar on a terminal, plain lines in a log; ``HDEBM_RAY_PROGRESS=0`` silences it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError, load_config, parse_override
from ..data.convert import check_not_inside, write_parquet_shards
from ..data.datasets import build_dataset
from ..evaluation.enfe import measure_enfe
from ..evaluation.features import FILE_KEYS, eval_files
from ..evaluation.fid import FeatureSpaces, evaluate_checkpoint
from ..evaluation.ood import ood_auroc
from ..evaluation.results import evaluated, record, scores_text
from ..evaluation.sampling import Sampler, default_device, save_grid
from ..io.checkpoint import load_config_of, load_meta, run_checkpoints
from ..progress import progress, write
from .args import at_least, device, existing_dir, image_out, local_checkpoint


def checkpoints_to_evaluate(args) -> list[str]:
    """Absolute checkpoint paths: the keys the eval pool writes to eval.jsonl, so neither scores one twice."""
    if args.checkpoint:
        return [str(Path(args.checkpoint).resolve())]
    found = run_checkpoints(str(Path(args.run).resolve()))
    if not found:
        raise ConfigError(f"--run {args.run}: no checkpoints (expected <run>/<stage>/checkpoint_*/meta.json)")
    return found


def results_location(ckpt: str) -> str:
    """Where a checkpoint's results go: its run (``<run>/<stage>/checkpoint_*``, the stage named in its meta),
    else, for a checkpoint outside a run, ``<checkpoint>/eval`` — never a folder above it that is not a run."""
    path = Path(ckpt).resolve()
    if path.parent.name == load_meta(path).get("stage"):
        return str(path.parent.parent)
    return str(path / "eval")


def evaluation_config(base, overrides: list[str], origin: str, trusted_files: dict | None = None):
    """A checkpoint's config with ``--set`` over it, where the keys that name a file to load (``FILE_KEYS``) come
    from ``--set`` or ``trusted_files`` (``eval --run``: the run's own config.yaml): a checkpoint's own value (it may
    come from elsewhere) is dropped, with a note."""
    given = dict(parse_override(o) for o in overrides)
    files = {key: given.pop(key, (trusted_files or {}).get(key, "")) for key in FILE_KEYS}
    ignored = [f"{key} = {value!r}" for key, value in eval_files(base).items() if value and value != files[key]]
    if ignored:
        write(f"[eval] {origin}: not using {', '.join(ignored)} from the checkpoint's config (pass it with --set)")
    return base.replace(**given, **files)


def cmd_eval(args) -> int:
    """FID / KID of one checkpoint, or of every checkpoint of a run not evaluated yet (results kept per run)."""

    todo = checkpoints_to_evaluate(args)
    run_config = Path(args.run or "") / "config.yaml"
    trusted = eval_files(load_config(config_file=run_config)) if args.run and run_config.is_file() else None
    spaces = FeatureSpaces(default_device(args.device), progress=True)
    for ckpt in progress(todo, desc="eval", unit="checkpoints", enabled=len(todo) > 1):
        run_location = results_location(ckpt)
        weights = None if args.ema is None else ("ema" if args.ema else "raw")
        if not args.force and str(ckpt) in evaluated(run_location, args.protocol, weights):
            write(f"[eval] {ckpt}: already evaluated (see {run_location}/eval.jsonl; --force to redo)")
            continue
        cfg = evaluation_config(load_config_of(ckpt), args.set, ckpt, trusted)
        n = args.n or cfg.eval.num_samples
        result = evaluate_checkpoint(
            ckpt, spaces(cfg), n, seed=args.seed, progress=True, use_ema=args.ema, protocol=args.protocol
        )
        record(run_location, result)
        write(
            f"[eval] {result['stage']} step {result['step']}: {scores_text(result)}  "
            f"({result['num_samples']} samples, {result['features']} features, {result['weights']} weights, "
            f"{result['protocol']} samples)"
        )
    return 0


def cmd_dataset_convert(args) -> int:
    overrides = [f"data.dataset={args.source}", f"data.path={args.input or ''}"]
    if args.resolution:
        overrides.append(f"data.resolution={args.resolution}")
    if args.channels:
        overrides.append(f"data.channels={args.channels}")
    cfg = load_config(None, None, overrides)

    dataset = build_dataset(cfg)
    check_not_inside(args.input, args.out)
    # refuses a folder with shards (without --overwrite) before the first image is read
    paths = write_parquet_shards(
        dataset, args.out, args.shard_size, progress=True, overwrite=args.overwrite, shuffle=not args.keep_order
    )
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


def cmd_sample(args) -> int:
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out '{args.out}' exists: pass --overwrite to replace it")
    device = default_device(args.device)
    sampler = Sampler(args.checkpoint, device=device, use_ema=args.ema, protocol=args.protocol)
    out = save_grid(sampler.sample(args.n, seed=args.seed), args.out, sampler.cfg, caption=sampler.caption())
    print(f"wrote {args.n} {sampler.stage} samples ({sampler.weights} weights, {sampler.protocol}) to {out}")
    return 0


def cmd_enfe(args) -> int:
    """Equivalent NFE of a checkpoint's sampler (docs/algorithms.md §7); prints one JSON line."""

    device = default_device(args.device)
    result = measure_enfe(
        args.checkpoint,
        args.batches,
        args.batch_size,
        args.diffusion_batches,
        device,
        diffusion_steps_timed=args.diffusion_steps_timed,
        reference=args.reference,
        progress=True,
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

    device = default_device(args.device)
    result = ood_auroc(args.checkpoint, args.in_source, args.out_source, args.n, device=device, progress=True)
    print(f"[ood] {result['stage']}: {result['in']} vs {result['out']}: AUROC {result['auroc']:.4f}", flush=True)
    print(json.dumps(result))
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


def add_inference_commands(sub) -> None:
    """The commands above, on ``hdebm-ray``'s sub-command parser."""
    p = sub.add_parser("eval", help="FID / KID of a checkpoint (or of every checkpoint of a run)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=local_checkpoint, help="one checkpoint directory")
    which.add_argument("--run", type=existing_dir, help="a run directory: every checkpoint not evaluated yet")
    p.add_argument("--n", type=at_least(2), help="samples per checkpoint (default eval.num_samples)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.features=classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="re-evaluate checkpoints that have a result")
    add_sampler_args(p)
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("dataset", help="dataset tools")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    c = dsub.add_parser("convert", help="write parquet shards of encoded images")
    c.add_argument("--source", required=True, choices=["digits", "cifar10", "image_folder", "parquet"])
    c.add_argument("--in", dest="input", help="source folder or URI (cifar10 root, image folder, parquet shards)")
    c.add_argument("--out", required=True, help="output folder or URI (s3://, gs://, file://) for shard-*.parquet")
    c.add_argument("--overwrite", action="store_true", help="remove the shards already in --out first")
    c.add_argument(
        "--keep-order", action="store_true", help="write in the source's order (default: a seeded random order)"
    )
    c.add_argument("--resolution", type=at_least(1))
    c.add_argument("--channels", type=int, choices=[1, 3])
    c.add_argument("--shard-size", type=at_least(1), default=10000)
    c.set_defaults(fn=cmd_dataset_convert)

    p = sub.add_parser("sample", help="draw samples from a checkpoint with its stage's sampler")
    p.add_argument("--checkpoint", type=local_checkpoint, required=True, help="a checkpoint directory (checkpoint_*)")
    p.add_argument("--n", type=at_least(1), default=64)
    p.add_argument("--out", type=image_out, required=True, help="image file to write (.png, .jpg, .webp, .bmp)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0)
    add_sampler_args(p)
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("enfe", help="equivalent NFE of a checkpoint's sampler against 1000-step diffusion")
    p.add_argument("--checkpoint", type=local_checkpoint, required=True)
    p.add_argument("--batches", type=at_least(1), default=100, help="sampler batches timed (the paper: 100)")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="the paper: 32")
    p.add_argument(
        "--diffusion-batches", type=at_least(1), help="1000-step diffusion batches timed (default: --batches)"
    )
    p.add_argument(
        "--diffusion-steps-timed",
        type=at_least(1),
        help="time this many (a divisor of 1000) of each diffusion batch's steps and scale to 1000 (default: all)",
    )
    p.add_argument(
        "--reference",
        type=local_checkpoint,
        help="checkpoint whose denoiser is timed (baselines have none of their own)",
    )
    p.add_argument("--device", type=device, help="default: cuda if available")
    p.set_defaults(fn=cmd_enfe)

    p = sub.add_parser("ood", help="AUROC of a checkpoint's energy as an out-of-distribution score")
    p.add_argument("--checkpoint", type=local_checkpoint, required=True)
    p.add_argument("--in", dest="in_source", help="in-distribution images (default: the checkpoint's dataset)")
    p.add_argument(
        "--out", dest="out_source", required=True, help="uniform, gaussian, constant, or a dataset (image_folder:PATH)"
    )
    p.add_argument("--n", type=at_least(2), default=2000, help="images per side")
    p.add_argument("--device", type=device, help="default: cuda if available")
    p.set_defaults(fn=cmd_ood)
