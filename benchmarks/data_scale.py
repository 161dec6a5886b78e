"""Benchmark: peak memory and throughput of every whole-dataset path at 1× and 8× the data, side by side.

    .venv/bin/python benchmarks/data_scale.py [--sizes 1000,8000] [--resolution 64] [--out benchmarks/results]

For each size, a folder of synthetic RGB images (smooth random fields, 10 class folders) is made, then each path
runs in a fresh process and reports its peak RSS (``VmHWM``) and images/s:

- ``convert``: ``dataset convert`` of the folder to parquet shards (1000 rows each);
- ``loader``: one epoch of the shards through Ray Data (read, decode, ``iter_torch_batches`` with a local shuffle
  buffer, 64 images a batch, mapped to [-1, 1] as a Train worker does) into this process, on an embedded local Ray
  with the Train workers' limits (``data.preprocess_cpus``, ``data.preprocess_object_store_mb``) and Ray's read
  tasks capped at 4 MiB of parquet (its default, 128 MiB, exceeds both sizes here but not ImageNet); peak RSS of
  the consumer and of the largest Ray worker process (the read / decode tasks; the object store's pages they
  touch count in their RSS);
- ``fid_reference``: the FID reference statistics streamed from the shards through a 2048-d TorchScript feature
  net on clean-fid's pipeline (PNG, 299-px resize), KID subset 1000 (``eval.kid_reference_samples``);
- ``p0_fit``: M-EBM's streamed p0 fit (64×64×3 = 12288 dimensions > ``p0_max_full_dim``: rank 512 + diagonal).

The goal is peak RSS at 8× ≤ 1.15× the peak at 1× for each path. The loader's images/s is set against what a
digits Stage 1 step consumes on this machine (its preset batch over its step time, in process): goal ≥ 3×.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def peak_rss_mb(pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ray_worker_peak_mb() -> float:
    """The largest peak RSS of this machine's Ray worker processes (``ray::...``)."""
    peak = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::"):
                peak = max(peak, peak_rss_mb(proc.name))
        except OSError:
            continue
    return peak


def make_folder(root: Path, n: int, resolution: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = max(2, resolution // 8)
    for i in range(n):
        field = rng.integers(0, 256, size=(coarse, coarse, 3), dtype=np.uint8)
        img = Image.fromarray(field).resize((resolution, resolution), Image.BICUBIC)
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.png")


def feature_net(path: Path) -> None:
    """A small 2048-d TorchScript feature net standing in for Inception (its weights cannot be fetched offline)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 8, stride=8), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 2048)
    )
    torch.jit.script(net.eval()).save(str(path))


def config(shards: Path, resolution: int, extra=()):
    from hdebm_ray.config import load_config

    return load_config(
        "digits",
        overrides=[
            "data.dataset=parquet",
            f"data.path={shards}",
            f"data.resolution={resolution}",
            "data.channels=3",
            *extra,
        ],
    )


def measure(path: str, work: Path, resolution: int) -> dict:
    """One path in this (fresh) process."""
    from hdebm_ray.data.datasets import build_dataset

    shards, start = work / "shards", time.perf_counter()
    if path == "convert":
        from hdebm_ray.data.convert import write_parquet_shards
        from hdebm_ray.data.files import ImageFiles

        source = ImageFiles(str(work / "images"), resolution, 3)
        write_parquet_shards(source, str(shards), shard_size=1000, overwrite=True)
        n = len(source)
    elif path == "loader":
        import ray

        from hdebm_ray.data.files import uint8_to_unit
        from hdebm_ray.distributed.ray_data import build_ray_dataset, preprocess_limits

        # Ray packs parquet row groups into read tasks of up to 128 MiB: a read task of a dataset smaller than that
        # holds it all, so its memory grows with the data until the cap. 4 MiB puts both sizes here past the cap,
        # where an ImageNet-sized dataset always is.
        os.environ["RAY_DATA_PARQUET_BIN_PACKING_BYTES"] = str(4 << 20)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()  # from the dataset's first read task, without Ray's own start
        cfg = config(shards, resolution, ["data.preprocess_cpus=2"])
        # what TorchTrainer's DataConfig sets for the workers (ray_data.trainer_data)
        ray.data.DataContext.get_current().execution_options.resource_limits = preprocess_limits(cfg)
        ds = build_ray_dataset(cfg)
        n, first = 0, None
        for batch in ds.iter_torch_batches(batch_size=64, drop_last=True, local_shuffle_buffer_size=1024):
            n += len(uint8_to_unit(batch["image"]))  # as a Train worker takes each batch
            first = first or time.perf_counter()
        seconds = time.perf_counter() - start
        steady = (n - 64) / (time.perf_counter() - first)
        out = {"images": n, "seconds": seconds, "images_per_s": n / seconds, "steady_images_per_s": steady}
        out |= {"peak_rss_mb": peak_rss_mb(), "ray_worker_peak_rss_mb": ray_worker_peak_mb()}
        ray.shutdown()
        return out
    elif path == "fid_reference":
        from hdebm_ray.evaluation.fid import FeatureSpace

        net = work / "features.pt"
        extra = ["eval.features=torchscript", f"eval.torchscript_path={net}", "eval.kid_reference_samples=1000"]
        stats = FeatureSpace(config(shards, resolution, extra)).reference()
        n = stats.n
    elif path == "p0_fit":
        from hdebm_ray.core.gaussian_init import cached_gaussian

        with tempfile.TemporaryDirectory() as cache:
            p0 = cached_gaussian(build_dataset(config(shards, resolution)), cache, "p0", 4096, 512, progress=False)
        n = len(build_dataset(config(shards, resolution)))
        assert p0.factor.shape == (resolution * resolution * 3, min(512, n - 1))
    else:
        raise SystemExit(f"unknown path {path!r}")
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mb": peak_rss_mb()}


def digits_stage1_images_per_s(steps: int = 12) -> dict:
    """What a digits Stage 1 step consumes, in process, at the preset's batch."""
    import statistics

    from common import untrained_distilled

    from hdebm_ray.config import load_config
    from hdebm_ray.contracts import WorkerContext
    from hdebm_ray.stages import build_stage
    from hdebm_ray.training.runner import local_bank

    cfg = load_config("digits")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = WorkerContext()
        ctx.bank = local_bank(cfg, "stage1", snapshot_dir=None)
        stage = build_stage("stage1", cfg, ctx, untrained_distilled(cfg, tmp))
        stage.on_start(0)
        times = []
        for step in range(steps + 2):
            t = time.perf_counter()
            metrics = stage.train_step(step)
            float(next(iter(metrics.values())))
            times.append(time.perf_counter() - t)
    sec = statistics.median(times[2:])
    return {"batch_size": cfg.stage1.batch_size, "sec_per_step": sec, "images_per_s": cfg.stage1.batch_size / sec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,8000")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--paths", default="convert,loader,fid_reference,p0_fit", help="which paths (convert first)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # child: one path
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.work), args.resolution)))
        return

    from common import machine, write_results

    sizes = [int(s) for s in args.sizes.split(",")]
    paths = tuple(args.paths.split(","))
    if paths[0] != "convert":
        raise SystemExit("--paths: the others read the shards that convert writes: list convert first")
    table: dict[str, dict[int, dict]] = {p: {} for p in paths}
    env = {**os.environ, "HDEBM_RAY_PROGRESS": "0", "RAY_AUTH_MODE": "disabled"}
    with tempfile.TemporaryDirectory(prefix="hdebm-data-scale-") as tmp:
        for n in sizes:
            work = Path(tmp) / f"n{n}"
            make_folder(work / "images", n, args.resolution)
            feature_net(work / "features.pt")
            for path in paths:
                cmd = [sys.executable, __file__, "--measure", path, "--work", str(work)]
                cmd += ["--resolution", str(args.resolution)]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
                if r.returncode:
                    raise SystemExit(f"{path} at {n} images failed:\n{r.stderr[-3000:]}")
                table[path][n] = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"[data_scale] {path:>13} {n:>6} images: {table[path][n]}", flush=True)
    consumer = digits_stage1_images_per_s() if "loader" in paths else None
    lo, hi = sizes[0], sizes[-1]
    result: dict = {"machine": machine(), "resolution": args.resolution, "sizes": sizes}
    for path in paths:
        for n in sizes:
            row = table[path][n]
            result[f"{path} {n}: peak RSS MB"] = row["peak_rss_mb"]
            result[f"{path} {n}: images/s"] = row["images_per_s"]
            if "ray_worker_peak_rss_mb" in row:
                result[f"{path} {n}: largest Ray worker peak RSS MB"] = row["ray_worker_peak_rss_mb"]
                result[f"{path} {n}: steady images/s"] = row["steady_images_per_s"]
        result[f"{path}: peak RSS {hi // lo}x data / 1x (goal <= 1.15)"] = (
            table[path][hi]["peak_rss_mb"] / table[path][lo]["peak_rss_mb"]
        )
    if "loader" in paths:
        result[f"loader Ray workers: peak RSS {hi // lo}x / 1x (goal <= 1.15)"] = (
            table["loader"][hi]["ray_worker_peak_rss_mb"] / table["loader"][lo]["ray_worker_peak_rss_mb"]
        )
    if "loader" not in paths:
        write_results(args.out, "data_scale", "Data paths at 1x and 8x the data (peak RSS, images/s)", result)
        return
    result["digits Stage 1 step: images/s consumed"] = consumer["images_per_s"]
    result["digits Stage 1 step: sec/step (batch)"] = f"{consumer['sec_per_step']:.3f} ({consumer['batch_size']})"
    result[f"loader {hi}: steady images/s / Stage 1 consumption (goal >= 3)"] = (
        table["loader"][hi]["steady_images_per_s"] / consumer["images_per_s"]
    )
    result[f"loader {hi}: epoch images/s (start included) / Stage 1 consumption"] = (
        table["loader"][hi]["images_per_s"] / consumer["images_per_s"]
    )
    write_results(args.out, "data_scale", "Data paths at 1x and 8x the data (peak RSS, images/s)", result)


if __name__ == "__main__":
    main()
