"""The eval pool on a real local Ray: every registered checkpoint scored exactly once, even when an eval actor is
killed mid-evaluation; training never waits for evaluation; the latest FID reaches the trainer's reports."""

from __future__ import annotations

import json
import math
import time

import ray
from helpers import small_digits_overrides
from ray.train import UserCallback

from hdebm_ray.config import load_config
from hdebm_ray.distributed.driver import fit_stage, running_eval_pool
from hdebm_ray.io.checkpoint import load_meta


def pool_config(tmp_path, steps: int):
    return load_config(
        "digits",
        overrides=small_digits_overrides(str(tmp_path), "evalpool")
        + [
            f"diffusion.steps={steps}",
            "diffusion.report_every=1",
            "diffusion.checkpoint_every=2",
            "ray.num_workers=1",
            "ray.checkpoints_to_keep=10",  # retention must not remove a checkpoint before its turn
            "eval.actors=1",
            "eval.cpus_per_actor=1",
            "eval.stages=[diffusion]",
            "eval.features=raw",
            "eval.num_samples=64",
            f"data.path={tmp_path / 'data'}",
        ],
    )


def wait_for(predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def alive_pid(actor) -> int | None:
    try:
        return ray.get(actor.pid.remote())
    except ray.exceptions.ActorUnavailableError:  # still restarting
        return None


class KeepReports(UserCallback):
    """Collects rank 0's reported metrics in a named actor (callbacks run in the Train controller)."""

    def after_report(self, run_context, metrics, checkpoint):
        ray.get_actor("report-log", namespace="hdebm").append.remote(metrics[0])


@ray.remote
class ReportLog:
    def __init__(self):
        self.items = []

    def append(self, item):
        self.items.append(item)

    def get(self):
        return self.items


def test_each_checkpoint_scored_once_despite_a_killed_actor_and_training_never_waits(ray_local, tmp_path):
    cfg = pool_config(tmp_path, steps=6)
    run = tmp_path / "evalpool"
    release = tmp_path / "release"  # evaluations are held until this file exists
    with running_eval_pool(cfg, hold_until=str(release)) as pool:
        fit_stage(cfg, "diffusion", eval_pool=pool)
        trained_at = time.time()
        # Training is over while every evaluation is still held: all 3 checkpoints are queued or running.
        status = wait_for(lambda: (s := ray.get(pool.status.remote()))["queued"] + s["running"] == 3 and s)
        assert status["done"] == 0 and not (run / "eval.jsonl").exists()
        # Kill the eval actor in the middle of its first evaluation; Ray restarts it and it gets the work again.
        (actor,) = ray.get(pool.actor_handles.remote())
        pid_before = ray.get(actor.pid.remote())
        ray.kill(actor, no_restart=False)
        wait_for(lambda: ray.get(pool.status.remote())["actor_deaths"] == 1)
        assert wait_for(lambda: alive_pid(actor)) != pid_before  # restarted: a new process
        release.touch()
    # Leaving the block drained the pool.
    results = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    checkpoints = sorted(str(p.parent) for p in (run / "diffusion").glob("checkpoint_*/meta.json"))
    assert len(checkpoints) == 3
    assert sorted(r["checkpoint"] for r in results) == checkpoints  # each exactly once
    assert sorted(r["step"] for r in results) == [2, 4, 6]
    assert all(math.isfinite(r["fid"]) and r["evaluated_at"] > trained_at for r in results)
    last_saved = max(load_meta(c)["saved_at"] for c in checkpoints)
    assert last_saved < min(r["evaluated_at"] for r in results)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("eval-")]

    # A driver that died before recording step 6's result (its line removed here) leaves it unscored: the same
    # run trained on with a fresh pool scores step 6 and the new step 8, not steps 2 and 4 again, and rank 0's
    # reports carry the newest known FID with the step it belongs to.
    lines = (run / "eval.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] != 6]
    (run / "eval.jsonl").write_text("".join(line + "\n" for line in kept))
    log = ReportLog.options(name="report-log", namespace="hdebm").remote()
    longer = pool_config(tmp_path, steps=8)
    with running_eval_pool(longer) as pool:
        fit_stage(longer, "diffusion", callbacks=[KeepReports()], eval_pool=pool)
    results = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in results) == [2, 4, 6, 8]
    reports = ray.get(log.get.remote())
    assert reports and all("Eval/fid" in m and "Eval/fid_step" in m for m in reports)
    last = reports[-1]
    assert last["Eval/fid_step"] in (4, 6)  # 4 is known from the start; 8 is scored after its own report
    assert abs(last["Eval/fid"] - next(r["fid"] for r in results if r["step"] == last["Eval/fid_step"])) < 1e-9
    ray.kill(log)
