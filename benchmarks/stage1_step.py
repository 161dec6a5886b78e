"""Benchmark: the HDEBM Stage 1 step in bare single-process PyTorch vs the same step in a 1-worker TorchTrainer,
and the bank actor's checkout + commit time as a fraction of the step time. Alternating blocks, side by side.

    .venv/bin/python benchmarks/stage1_step.py [--preset digits] [--steps 30] [--out benchmarks/results]

Both sides run the same config with one thread (a Ray worker with 1 CPU gets OMP_NUM_THREADS=1). The Ray side's
step time is read back from the TensorBoard scalars its rank 0 writes (median over report ticks, first tick
skipped as warm-up): ``Timing/sec_per_step`` (the tick's wall time / steps, its report included) and
``Timing/train_step_s`` (the steps alone); their difference x report_every is the cost of one report. Ray blocks
(a fresh local Ray each) alternate with bare blocks, and each Ray block is divided by the mean of the bare blocks
on either side, since this machine's speed drifts by 10-20% over minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, untrained_distilled, write_results

from hdebm_ray.config import load_config
from hdebm_ray.contracts import WorkerContext
from hdebm_ray.stages import build_stage, stage_class
from hdebm_ray.training.runner import local_bank


def bare_step_seconds(cfg, init_dir, steps: int) -> tuple[float, float]:
    """Median seconds per Stage 1 step in this process, and the median exposed bank time per step."""
    ctx = WorkerContext()
    ctx.bank = local_bank(cfg, "stage1", snapshot_dir=None)
    stage = build_stage("stage1", cfg, ctx, init_dir)
    stage.on_start(0)
    times, bank = [], []
    for step in range(steps + 3):
        t0 = time.perf_counter()
        m = stage.train_step(step)
        if step >= 3:
            times.append(time.perf_counter() - t0)
            bank.append(m["Timing/bank_wait_s"] + m["Timing/bank_commit_s"])
    return statistics.median(times), statistics.median(bank)


def ray_step_seconds(cfg, init_dir) -> tuple[float, float, float]:
    """Median seconds per step of the same stage in a 1-worker TorchTrainer (whole tick / steps), of its steps
    alone (train_step, without the tick's report), and its exposed bank time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hdebm_ray.distributed.driver import fit_stage
    from hdebm_ray.io.storage import run_dir

    fit_stage(cfg, "stage1", str(init_dir))
    acc = EventAccumulator(str(Path(run_dir(cfg)) / "tb" / "stage1"))
    acc.Reload()
    sps = [e.value for e in acc.Scalars("Timing/sec_per_step")][1:]
    steps_only = [e.value for e in acc.Scalars("Timing/train_step_s")][1:]
    bank = [
        a.value + b.value
        for a, b in zip(acc.Scalars("Timing/bank_wait_s"), acc.Scalars("Timing/bank_commit_s"), strict=True)
    ][1:]
    return statistics.median(sps), statistics.median(steps_only), statistics.median(bank)


def actor_round_trip_seconds(cfg, n: int, rounds: int = 50) -> float:
    """Median driver-side round trip of checkout(n) + commit(n entries) against a real bank actor."""
    import ray

    from hdebm_ray.distributed.bank_actor import create_bank_actor

    spec = stage_class("stage1").bank_spec(cfg)
    actor = create_bank_actor("bank-benchmark", **spec.arguments(), snapshot_dir=None)
    fields = {k: np.random.randn(n, *s).astype(np.float32) for k, s in spec.shapes.items()}
    ray.get(actor.fill.remote(0, 0, {k: np.zeros((spec.size, *s), np.float32) for k, s in spec.shapes.items()}))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        lease = ray.get(actor.checkout.remote(n, "bench"))
        ray.get(actor.commit.remote(lease["lease"], 1, fields))
        times.append(time.perf_counter() - t0)
    ray.kill(actor)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="Ray blocks, each between two bare blocks")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="hdebm-bench-")
    tick = 5
    cfg = load_config(
        args.preset,
        overrides=[
            f"run.storage_path={tmp}",
            "run.name=bench",
            "ray.num_workers=1",
            "ray.max_failures=0",
            "diffusion.report_every=1",
            f"stage1.steps={args.steps + tick}",
            f"stage1.report_every={tick}",
            f"stage1.checkpoint_every={args.steps + tick}",
        ],
    )
    ck = untrained_distilled(cfg, tmp)

    import ray

    from hdebm_ray.distributed.cluster import init_ray

    # This machine's speed drifts by 10-20% over minutes (a shared VM): bare and Ray blocks alternate, and each
    # Ray block is compared with the bare blocks on either side of it.
    bare, rays, steps_only, banks = [], [], [], []
    bare_s, bare_bank_s = bare_step_seconds(cfg, ck, args.steps)
    bare.append(bare_s)
    for r in range(args.rounds):
        init_ray(cfg)
        ray_s, ray_steps_only_s, ray_bank_s = ray_step_seconds(cfg.replace(**{"run.name": f"bench{r}"}), ck)
        if r == args.rounds - 1:
            rt_s = actor_round_trip_seconds(cfg, cfg.stage1.batch_size // cfg.ray.num_workers)
        ray.shutdown()
        rays.append(ray_s), steps_only.append(ray_steps_only_s), banks.append(ray_bank_s)
        bare.append(bare_step_seconds(cfg, ck, args.steps)[0])
    ratios = [t / ((bare[i] + bare[i + 1]) / 2) for i, t in enumerate(rays)]
    ratios_steps_only = [t / ((bare[i] + bare[i + 1]) / 2) for i, t in enumerate(steps_only)]
    bare_s, ray_s = statistics.median(bare), statistics.median(rays)
    ray_steps_only_s, ray_bank_s = statistics.median(steps_only), statistics.median(banks)

    result = {
        "preset": args.preset,
        "batch_size": cfg.stage1.batch_size,
        "langevin_steps": cfg.stage1.langevin.steps,
        "bank_size": cfg.stage1.bank_size,
        "machine": machine(),
        "bare_pytorch_sec_per_step": bare_s,
        "torchtrainer_1worker_sec_per_step": ray_s,
        "rounds": args.rounds,
        "bare_blocks_sec_per_step": bare,
        "torchtrainer_blocks_sec_per_step": rays,
        "ratio_torchtrainer_over_bare": statistics.median(ratios),
        "ratio_per_round": ratios,
        "torchtrainer_train_step_only_sec": ray_steps_only_s,
        "ratio_train_step_only_over_bare": statistics.median(ratios_steps_only),
        "per_report_cost_sec": (ray_s - ray_steps_only_s) * tick,
        "bank_actor_round_trip_sec": rt_s,
        "bank_round_trip_fraction_of_step": rt_s / ray_s,
        "bank_exposed_sec_per_step_in_worker": ray_bank_s,
        "bank_exposed_fraction_of_step": ray_bank_s / ray_s,
        "bank_local_sec_per_step_bare": bare_bank_s,
    }
    write_results(args.out, "stage1_step", "Stage 1 step: bare PyTorch vs 1-worker TorchTrainer", result)


if __name__ == "__main__":
    main()
