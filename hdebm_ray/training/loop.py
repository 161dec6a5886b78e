"""The step loop every stage shares, independent of Ray.

A stage (diffusion, distillation, HDEBM Stage 1/2, baselines) is a ``contracts.Stage``: ``train_step(step) ->
metrics``, ``state_dict()`` / ``load_state_dict()`` over named plain state_dicts, ``total_steps``,
``images_per_step`` and hooks. ``run_loop`` drives it from a start step to the end, calling ``report(step,
metrics, with_checkpoint)`` once per tick; the Ray worker (``distributed/worker.py``) and the in-process runner
(``runner.py``) only differ in what ``report`` does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import torch

from ..contracts import Stage
from ..core.ranks import check_replicas_agree
from .guard import Divergence
from .interrupts import Interruption, Stopped

ReportFn = Callable[[int, dict[str, float], bool], None]


class Interrupts(Protocol):
    """Where a stop or a preemption notice comes from (``session.py`` adapts a port to it)."""

    every: int  # steps between checks (0: never)

    def check(self, done: int) -> Interruption | None:
        """Every rank, after the same steps: a reason to checkpoint now, else None."""

    def hold(self, interruption: Interruption) -> None:
        """After a preemption checkpoint: wait for the node to go (returns if it stays)."""


def run_loop(
    stage: Stage,
    start_step: int,
    report: ReportFn,
    guard=None,
    stop_at: int | None = None,
    interrupts: Interrupts | None = None,
) -> Divergence | Stopped | None:
    """Train from ``start_step`` to ``stage.total_steps``; metrics are averaged over each report tick.

    With ``guard`` (a ``step_guard.StepGuard``) every step's metrics are checked, and the loop returns the first
    ``guard.Divergence`` any rank saw, before the report (and checkpoint) that would follow it. ``stop_at``: stop
    after this step instead, with a report and checkpoint there (a PBT chunk's end); the schedules still run towards
    ``total_steps``. ``interrupts``: checked every ``interrupts.every`` steps; on an interruption the stage reports
    with a checkpoint at that step, then holds (a preemption) or returns ``Stopped`` (a stop). Else None at the end.
    """
    end = stage.total_steps if stop_at is None else min(stop_at, stage.total_steps)
    stage.on_start(start_step)
    sums: dict[str, float | torch.Tensor] = {}
    counts: dict[str, int] = {}  # per key: some metrics appear only on some steps
    count, step_s, tick_start = 0, 0.0, time.perf_counter()
    for step in range(start_step, end):
        t0 = time.perf_counter()
        if guard is None:
            step_metrics = stage.train_step(step)
        else:
            with guard.testing_hook(stage, step):
                step_metrics = stage.train_step(step)
            guard.observe(step, step_metrics)
        for k, v in step_metrics.items():
            # Tensor metrics are summed on their device and read once per tick: no host sync per step.
            sums[k] = sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else float(v))
            counts[k] = counts.get(k, 0) + 1
        step_s += time.perf_counter() - t0
        count += 1
        done = step + 1
        interruption = None
        if interrupts is not None and interrupts.every and done % interrupts.every == 0 and done < end:
            interruption = interrupts.check(done)
        tick = done % stage.report_every == 0 or done == end or interruption is not None
        # no checkpoint after a violation nobody has seen: the guard is read before every report
        if guard is not None and (tick or guard.due(done)) and (divergence := guard.poll()) is not None:
            return dataclasses.replace(divergence, seen_after=done)
        if tick:
            metrics = {k: float(v) / counts[k] for k, v in sums.items()}  # the tick's one sync
            elapsed = time.perf_counter() - tick_start
            metrics["Timing/sec_per_step"] = elapsed / count
            # the steps alone; sec_per_step also counts the previous tick's report, logging and checkpoint
            metrics["Timing/train_step_s"] = step_s / count
            metrics["Timing/images_per_sec"] = count * stage.images_per_step / max(elapsed, 1e-9)
            metrics.update(stage.tick_metrics(done))
            if guard is not None:
                metrics.update(guard.metrics())
            with_ckpt = done % stage.checkpoint_every == 0 or done == end or interruption is not None
            if with_ckpt:
                for name, module in stage.ctx.replicated.items():
                    check_replicas_agree(module, f"{stage.name}'s {name}")
                stage.before_checkpoint(done)
            report(done, metrics, with_ckpt)
            sums, counts, count, step_s, tick_start = {}, {}, 0, 0.0, time.perf_counter()
        if interruption is not None:
            if interruption.kind == "stop":
                return Stopped(done, interruption.reason)
            interrupts.hold(interruption)
            tick_start = time.perf_counter()  # the wait is no step's time
    return None
