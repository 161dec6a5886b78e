"""Stages under failures on a real local Ray: the chaos test (SIGKILL of a Train worker, the bank actor, an eval
actor and the driver of one Stage 1 run), and a divergence injected into M-EBM's energy (rolled back by the
guard, with the replay buffer of that step)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from helpers import TINY, newest_registered_step, small_digits_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hdebm_ray.bank.service import Bank
from hdebm_ray.bank.store import SlotStore, snapshot_name
from hdebm_ray.config import load_config
from hdebm_ray.distributed.driver import bank_actor_name, fit_stage
from hdebm_ray.evaluation.results import read_results
from hdebm_ray.io.checkpoint import load_config_of, load_meta, registered_names, run_checkpoints
from hdebm_ray.training.runner import run_in_process


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """One tiny distilled digits model both Stage 1 tests start from (in process: the tests are about Stage 1)."""
    root = tmp_path_factory.mktemp("distilled")
    cfg = load_config("digits", overrides=small_digits_overrides(str(root), "base") + TINY)
    _, ck = run_in_process(cfg, "diffusion", root / "d")
    return str(run_in_process(cfg, "distill", root / "k", init_dir=ck)[1])


def _wait(predicate, what: str, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive_pids(class_name: str, name: str | None = None) -> list[int]:
    from ray.util.state import list_actors

    alive = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    found = list_actors(filters=alive, raise_on_missing_output=False)
    return [a.pid for a in found if a.pid and (name is None or a.name == name)]


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], "death")


def test_chaos_sigkill_of_a_train_worker_the_bank_an_eval_actor_and_the_driver(ray_local, distilled, tmp_path):
    """One 2-worker digits Stage 1 with the eval pool on, started from the CLI as its own driver process against
    this module's Ray; SIGKILLed in turn: a Train worker, the bank actor, the eval actor, the driver (then the same
    command again). The run completes; the bank's own records show every step's 16 slots written once each
    (nothing lost or doubled across three restores), and every checkpoint has exactly one evaluation."""
    run = tmp_path / "chaos"
    overrides = small_digits_overrides(str(tmp_path), "chaos") + TINY
    overrides += ["stage1.steps=16", "ray.num_workers=2", "ray.max_failures=3", "ray.checkpoints_to_keep=10"]
    overrides += ["eval.actors=1", "eval.stages=[stage1]"]
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "hdebm_ray", "train", "--stage", "stage1", "--preset", "digits"]
    cmd += ["--init-from", distilled, "--address", address] + [a for o in overrides for a in ("--set", o)]
    cfg = load_config("digits", overrides=overrides)
    bank_name = bank_actor_name(cfg, "stage1")
    logs = [tmp_path / "driver-1.log", tmp_path / "driver-2.log"]
    with open(logs[0], "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    killed: dict[str, tuple[int, int]] = {}  # what -> (pid, newest checkpoint step when killed)

    def kill_after_next_checkpoint(what: str, pid_of) -> None:
        before = max([0, *(step for _, step in killed.values())])
        newer = lambda: (s := newest_registered_step(run / "stage1")) > before and s  # noqa: E731
        step = _wait(newer, f"a checkpoint after {before}")
        pid = _wait(pid_of, f"a live {what}")
        _sigkill(pid)
        killed[what] = (pid, step)

    kill_after_next_checkpoint("train worker", lambda: next(iter(_alive_pids("RayTrainWorker")), None))
    kill_after_next_checkpoint("bank actor", lambda: next(iter(_alive_pids("BankActor", bank_name)), None))
    kill_after_next_checkpoint("eval actor", lambda: next(iter(_alive_pids("EvalActor")), None))
    kill_after_next_checkpoint("driver", lambda: driver.poll() is None and driver.pid)
    assert driver.wait(timeout=30) == -signal.SIGKILL
    assert [step for _, step in killed.values()] == sorted({step for _, step in killed.values()})
    assert killed["driver"][1] < 16, "the run finished before the driver could be killed"
    # The same command again: a new driver resumes the run from its newest checkpoint.
    with open(logs[1], "w") as log:
        assert subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode == 0
    first, second = (p.read_text() for p in logs)

    # What Ray Train registered: a checkpoint written but not registered when the driver died is superseded.
    registered = {str(run / "stage1" / n) for n in registered_names(str(run / "stage1"))}
    assert set(run_checkpoints(str(run), ["stage1"])) == registered
    ckpts = sorted((load_meta(c)["step"], c) for c in registered)
    final = load_meta(ckpts[-1][1])
    assert final["step"] == 16 and final["done"]
    assert "actor was restarted" in first  # the workers saw the bank come back empty and rolled back
    # Every restart restored the bank of the very checkpoint it resumed from: after the worker, the bank actor,
    # and the driver were killed.
    restores = final["summary"]["bank_restores"]
    assert len(restores) >= 3 and all(r["bank_step"] == r["checkpoint_step"] for r in restores)
    # the second driver resumed from the newest checkpoint registered before the kill
    assert killed["eval actor"][1] <= final["resumed_from_step"] <= killed["driver"][1]
    # The bank audit, by the run itself and again here from the final snapshot's slot ids and step counts.
    assert final["summary"]["bank_audit"] == {"step": 16, "problems": []}
    store, _ = SlotStore.load(str(run / "stage1" / "bank" / snapshot_name(16)))
    bank = Bank(store.size, store.shapes)
    bank.load_store(store)
    assert bank.audit(16, 16) == [] and list(store.step_writes[1:]) == [16] * 16
    assert store.writes.sum() == 48 + 16 * 16  # the fill, then each step's 16 slots once

    # Every registered checkpoint scored exactly once, across the killed eval actor and the two drivers, and
    # nothing else.
    results = read_results(str(run))
    scored = sorted(r["checkpoint"] for r in results)
    assert scored == sorted(set(scored)) and set(scored) == registered
    assert all(math.isfinite(r["fid"]) for r in results)
    assert "stage1 finished in" in second


def test_injected_divergence_rolls_back_to_the_checkpoint_and_its_buffer_and_the_run_finishes(ray_local, tmp_path):
    overrides = ["mebm.steps=6", "guard.inject_nan_at_step=3", "ray.max_failures=0"]
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "guard") + TINY + overrides)
    out = fit_stage(cfg, "mebm")
    meta = load_meta(out.checkpoint)
    assert meta["step"] == 6 and meta["done"]
    (rollback,) = meta["guard"]["rollbacks"]
    assert (rollback["step"], rollback["to"], rollback["value"]) == (3, 2, "nan")
    # the second attempt resumed at step 2 with the buffer of step 2, backed off, and its checkpoints say so
    assert meta["summary"]["buffer_restores"] == [{"checkpoint_step": 2, "buffer_step": 2}]
    backed = load_config_of(out.checkpoint)
    assert backed.mebm.lr == cfg.mebm.lr / 2 and backed.mebm.langevin.step_size == cfg.mebm.langevin.step_size / 2
    run = tmp_path / "guard"
    assert json.loads((run / "mebm" / "guard.json").read_text())["scale"] == 0.5
    assert not (run / "mebm" / "divergence.json").exists()
    acc = EventAccumulator(str(run / "tb" / "mebm"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("Guard/rollbacks")][-1] == 1


def test_stage2_on_ray_trains_and_saves_the_step_sizes_its_stage1_backed_off_to(ray_local, distilled, tmp_path):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "inherit") + TINY)
    _, s1 = run_in_process(cfg.replace(**{"guard.inject_nan_at_step": 3}), "stage1", tmp_path / "s1", distilled)
    out = fit_stage(cfg, "stage2", init_from=str(s1))
    saved = load_config_of(out.checkpoint).stage2
    assert saved.langevin.y_step_size == pytest.approx(cfg.stage2.langevin.y_step_size * cfg.guard.backoff)
    assert saved.langevin.z2_step_size == pytest.approx(cfg.stage2.langevin.z2_step_size * cfg.guard.backoff)
    assert saved.lr == cfg.stage2.lr
