"""Benchmark: Stage 1 training speed with the eval pool scoring checkpoints alongside vs without it, in one run.

    .venv/bin/python benchmarks/eval_overhead.py [--preset digits] [--steps 60] [--checkpoint-every 10]

The same 1-worker Stage 1 run twice from the same distilled denoiser: once with ``eval.actors=0``, once with one
eval actor (its own CPU) scoring every checkpoint while training goes on. Steps per second are read back from
rank 0's TensorBoard ``Timing/sec_per_step`` (median over report ticks, the first skipped as warm-up); the wall
time of each fit and how many evaluations finished before training did are reported too. The reference features
are computed before timing starts, as they would be cached after a run's first evaluation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine, untrained_distilled, write_results

from hdebm_ray.config import load_config


def timed_fit(cfg, init_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hdebm_ray.distributed.driver import fit_stage, running_eval_pool
    from hdebm_ray.evaluation.results import read_results
    from hdebm_ray.io.storage import run_dir

    with running_eval_pool(cfg) as pool:
        t0 = time.perf_counter()
        fit_stage(cfg, "stage1", init_dir, eval_pool=pool)
        wall_s, trained_at = time.perf_counter() - t0, time.time()
    acc = EventAccumulator(str(Path(run_dir(cfg)) / "tb" / "stage1"))
    acc.Reload()
    sps = statistics.median(e.value for e in acc.Scalars("Timing/sec_per_step")[1:])
    results = read_results(run_dir(cfg))
    return {
        "sec_per_step": sps,
        "fit_wall_s": wall_s,
        "evaluations": len(results),
        "evaluations_done_during_training": sum(r["evaluated_at"] <= trained_at for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="hdebm-bench-")
    base = load_config(
        args.preset,
        overrides=[
            f"run.storage_path={tmp}",
            f"data.path={tmp}/data",
            "ray.num_workers=1",
            "ray.max_failures=0",
            "ray.checkpoints_to_keep=100",
            f"stage1.steps={args.steps}",
            "stage1.report_every=5",
            f"stage1.checkpoint_every={args.checkpoint_every}",
            f"eval.num_samples={args.eval_samples}",
            "eval.cpus_per_actor=1",
        ],
    )
    ck = untrained_distilled(base, tmp)

    from hdebm_ray.distributed.cluster import init_ray
    from hdebm_ray.evaluation.fid import FeatureSpace

    FeatureSpace(base).reference()  # cached next to the data, as after a run's first evaluation
    without_cfg = base.replace(**{"run.name": "without-eval", "eval.actors": 0})
    with_cfg = base.replace(**{"run.name": "with-eval", "eval.actors": 1, "eval.stages": ("stage1",)})
    init_ray(with_cfg)  # sized for the run with the pool; both runs share this Ray
    without = timed_fit(without_cfg, ck)
    with_pool = timed_fit(with_cfg, ck)
    result = {
        "preset": args.preset,
        "batch_size": base.stage1.batch_size,
        "langevin_steps": base.stage1.langevin.steps,
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "eval_features": base.eval.features,
        "eval_samples": args.eval_samples,
        "machine": machine(),
        "without_eval_sec_per_step": without["sec_per_step"],
        "with_eval_sec_per_step": with_pool["sec_per_step"],
        "steps_per_sec_ratio_with_over_without": without["sec_per_step"] / with_pool["sec_per_step"],
        "without_eval_fit_wall_s": without["fit_wall_s"],
        "with_eval_fit_wall_s": with_pool["fit_wall_s"],
        "evaluations_done_during_training": with_pool["evaluations_done_during_training"],
        "evaluations_total": with_pool["evaluations"],
    }
    write_results(args.out, "eval_overhead", "Stage 1 training with vs without the eval pool", result)


if __name__ == "__main__":
    main()
