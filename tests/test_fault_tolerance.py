"""Stages under failures on a real local Ray: a Train worker killed mid-run, the bank actor killed mid-run, and a
divergence injected into M-EBM's energy (rolled back by the guard, with the replay buffer of that step)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import helpers
import pytest
import ray
from helpers import TINY, ExitOnce, small_digits_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hdebm_ray.checkpoint import load_config_of, load_meta
from hdebm_ray.config import load_config
from hdebm_ray.distributed.driver import bank_actor_name, fit_stage
from hdebm_ray.runner import run_in_process

LONGER = ["stage1.steps=12", "stage1.report_every=2", "stage1.checkpoint_every=2", "ray.max_failures=1"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """One tiny distilled digits model both Stage 1 tests start from (in process: the tests are about Stage 1)."""
    root = tmp_path_factory.mktemp("distilled")
    cfg = load_config("digits", overrides=small_digits_overrides(str(root), "base") + TINY)
    _, ck = run_in_process(cfg, "diffusion", root / "d")
    return str(run_in_process(cfg, "distill", root / "k", init_dir=ck)[1])


def test_killed_train_worker_resumes_with_the_bank_of_the_restored_checkpoint(ray_local, distilled, tmp_path):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "wkill") + TINY + LONGER)
    marker = tmp_path / "failed-once"
    # Workers cannot import the tests' modules: the hook travels by value.
    ray.cloudpickle.register_pickle_by_value(helpers)
    out = fit_stage(cfg, "stage1", distilled, report_hooks=[ExitOnce(1, 6, str(marker))])
    assert marker.exists()  # the worker did die
    meta = load_meta(out["checkpoint"])
    assert meta["step"] == 12 and meta["done"]
    restores = meta["summary"]["bank_restores"]
    assert restores, "the restarted worker group did not restore from a checkpoint"
    for r in restores:  # Ray may restore an older checkpoint than the newest; the bank must follow it
        assert r["bank_step"] == r["checkpoint_step"]


def test_killed_bank_actor_restarts_from_its_snapshot_and_training_finishes(ray_local, distilled, tmp_path):
    cfg = load_config(
        "digits", overrides=small_digits_overrides(str(tmp_path), "akill") + TINY + LONGER + ["stage1.steps=16"]
    )
    init = distilled
    bank_dir = Path(tmp_path) / "akill" / "stage1" / "bank"
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not list(bank_dir.glob("bank_step_*.arrow")):
            time.sleep(0.05)
        actor = ray.get_actor(bank_actor_name(cfg, "stage1"), namespace="hdebm")
        ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1)
        killed["at"] = sorted(p.name for p in bank_dir.glob("bank_step_*.arrow"))

    t = threading.Thread(target=killer)
    t.start()
    out = fit_stage(cfg, "stage1", init)
    t.join()
    assert killed["at"]
    meta = load_meta(out["checkpoint"])
    assert meta["step"] == 16 and meta["done"]
    reloads = meta["summary"].get("bank_reloads")
    assert reloads and reloads[0]["snapshot_step"] is not None and reloads[0]["snapshot_step"] >= 2


def test_injected_divergence_rolls_back_to_the_checkpoint_and_its_buffer_and_the_run_finishes(ray_local, tmp_path):
    overrides = ["mebm.steps=6", "guard.inject_nan_at_step=3", "ray.max_failures=0"]
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "guard") + TINY + overrides)
    out = fit_stage(cfg, "mebm")
    meta = load_meta(out["checkpoint"])
    assert meta["step"] == 6 and meta["done"]
    (rollback,) = meta["guard"]["rollbacks"]
    assert (rollback["step"], rollback["to"], rollback["value"]) == (3, 2, "nan")
    # the second attempt resumed at step 2 with the buffer of step 2, backed off, and its checkpoints say so
    assert meta["summary"]["buffer_restores"] == [{"checkpoint_step": 2, "buffer_step": 2}]
    backed = load_config_of(out["checkpoint"])
    assert backed.mebm.lr == cfg.mebm.lr / 2 and backed.mebm.sgld.step_size == cfg.mebm.sgld.step_size / 2
    run = tmp_path / "guard"
    assert json.loads((run / "mebm" / "guard.json").read_text())["scale"] == 0.5
    assert not (run / "mebm" / "divergence.json").exists()
    acc = EventAccumulator(str(run / "tb" / "mebm"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("Guard/rollbacks")][-1] == 1
