"""Population-based training over Stage 1 through the real CLI, interrupted and resumed.

`hdebm-ray tune --scheduler pbt` runs 4 toy2d trials of 40 steps in chunks of 20 (each chunk its own TorchTrainer
run), in a subprocess with its own embedded Ray (this module starts none, so two Ray instances never share the
machine). Once a trial has been cloned from a better one it is interrupted with SIGINT, then finished with
`--resume`. Checked: the clone went on from the donor's step-20 state (weights, Adam, bank) with new parameters;
no trial trained its first chunk twice; the sweep's table and best config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TOY_TRIAL, distilled_toy

from hdebm_ray.cli.main import main as cli_main
from hdebm_ray.config import load_config
from hdebm_ray.io.checkpoint import load_meta, load_states

pytestmark = pytest.mark.ray  # its sweeps start their own embedded Ray through the CLI

KEY = "stage1.langevin.step_size"
LO, HI = 1.0e-3, 2.0e-2


def history(trials: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(trials.glob("trial-*/stage1/pbt_history.jsonl")) for line in f.open()]


def newest(paths) -> Path:
    return max(paths, key=lambda p: p.stat().st_mtime)


def test_pbt_clones_a_better_trial_into_a_worse_one_and_an_interrupted_sweep_resumes_from_the_checkpoints(tmp_path):
    init = distilled_toy(tmp_path / "toy")
    space = tmp_path / "space.yaml"
    space.write_text(
        f"stage: stage1\nmetric: Eval/toy2d_quality\nmode: max\nparams:\n  {KEY}: {{loguniform: [{LO}, {HI}]}}\n"
    )
    sets = [a for o in [f"run.storage_path={tmp_path}", "run.name=toy", *TOY_TRIAL] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "hdebm_ray", "tune", "--preset", "toy2d", *sets, "--space", str(space)]
    cmd += ["--name", "pbt", "--samples", "4", "--max-concurrent", "4", "--cpus-per-worker", "0.5"]
    cmd += ["--scheduler", "pbt", "--pbt-interval", "20", "--init-from", init]
    trials = tmp_path / "pbt" / "trials"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    deadline = time.time() + 480
    while not [h for h in history(trials) if h["from_trial"] != h["trial"]]:  # the first exploit
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert not (tmp_path / "pbt" / "trials.csv").exists()

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=os.environ)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"--config {tmp_path / 'pbt' / 'best_config.yaml'} --init-from {init}" in second.stdout  # how to train it

    starts = history(trials)
    original = {h["trial"]: h["from_params"][KEY] for h in starts if h["from_trial"] == h["trial"]}
    exploits = [h for h in starts if h["from_trial"] != h["trial"]]
    assert exploits and all(h["step"] == 20 for h in exploits), starts
    for h in exploits:
        # explored: the donor's value times 1.2 or 0.8, or redrawn; within the space's range
        value, run = h["params"][KEY], trials / f"trial-{h['trial']}"
        assert LO <= value <= HI and value != h["from_params"][KEY] and value != original.get(h["trial"]), h
        # the first copy the clone made is the donor's step-20 state: weights, generator, Adam moments
        adopted = min(run.glob("stage1-adopted/*/checkpoint_00000020"), key=lambda p: p.stat().st_mtime)
        (donor,) = (trials / f"trial-{h['from_trial']}").glob("stage1-to-00000020-*/checkpoint_0*")
        for net in ("energy", "generator", "energy_opt"):
            a, d = load_states(adopted, [net])[net], load_states(donor, [net])[net]
            if net == "energy_opt":
                a, d = a["state"][0], d["state"][0]
            assert all(torch.equal(a[k], d[k]) for k in a), net
        # ... and it trained on from there, with its new step size and the bank of step 20
        final = newest(run.glob("stage1-to-00000040-*/checkpoint_0*"))
        meta = load_meta(final)
        assert meta["step"] == 40 and meta["done"] and meta["resumed_from_step"] == 20
        assert load_states(final, ["energy_opt"])["energy_opt"]["state"][0]["step"] == 40
        assert load_config(config_file=str(final / "config.yaml")).stage1.langevin.step_size == value
        assert meta["summary"]["bank_restores"] == [{"checkpoint_step": 20, "bank_step": 20}]
        assert meta["summary"]["bank_audit"] == {"step": 40, "problems": []}

    # the interruption cost no finished chunk: every trial trained steps 1-20 exactly once
    for run in trials.glob("trial-*"):
        assert len(list(run.glob("stage1-to-00000020-*"))) == 1, run
        assert load_meta(newest(run.glob("stage1-to-00000040-*/checkpoint_0*")))["done"]
    table = (tmp_path / "pbt" / "trials.csv").read_text().splitlines()
    assert len(table) == 5 and f"config/{KEY}" in table[0]
    best_config = tmp_path / "pbt" / "best_config.yaml"
    best = load_config(config_file=str(best_config))
    assert best.stage1.steps == 40 and best.run.name == "toy-best" and LO <= best.stage1.langevin.step_size <= HI
    # a real run of it would be refused without the sweep's starting checkpoint, and so is its dry run
    assert cli_main(["train", "--stage", "stage1", "--config", str(best_config), "--dry-run"]) == 2
    assert cli_main(["train", "--stage", "stage1", "--config", str(best_config), "--init-from", init, "--dry-run"]) == 0
    assert list((tmp_path / "pbt").glob("*/events.out.tfevents.*"))  # Tune's own TensorBoard output
