"""An interrupted sweep resumed with --resume finishes without repeating completed trials.

The sweep runs as the real CLI in a subprocess (its own embedded Ray; this module starts none, so two Ray
instances never share the machine) and is interrupted with SIGINT once its first trial has finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import TOY_TRIAL, distilled_toy


def finished_trials(sweep: Path) -> list[Path]:
    out = []
    for trial in sorted((sweep / "trials").glob("trial-*")):
        metas = list((trial / "stage1").glob("checkpoint_*/meta.json"))
        if any('"done": true' in m.read_text() for m in metas):
            out.append(trial)
    return out


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    init = distilled_toy(tmp_path / "toy")
    space = tmp_path / "space.yaml"
    space.write_text(
        "stage: stage1\nmetric: Eval/toy2d_quality\nmode: max\n"
        "params:\n  stage1.langevin.step_size: {grid: [3.0e-3, 5.0e-3]}\n"
    )
    sets = [a for o in [f"run.storage_path={tmp_path}", "run.name=toy", *TOY_TRIAL] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "hdebm_ray", "tune", "--preset", "toy2d", *sets, "--space", str(space)]
    cmd += ["--name", "resumable", "--samples", "1", "--max-concurrent", "1", "--init-from", init]
    sweep = tmp_path / "resumable"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    deadline = time.time() + 400
    # with one trial at a time, the second trial's run directory appears once Tune has finished the first
    while len(list((sweep / "trials").glob("trial-*"))) < 2:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(1)
    done_first = finished_trials(sweep)[0]
    checkpoints_before = sorted(p.name for p in (done_first / "stage1").glob("checkpoint_*"))
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert not (sweep / "trials.csv").exists()
    assert len(finished_trials(sweep)) < 2

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=os.environ)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = (sweep / "trials.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 trials
    assert len(finished_trials(sweep)) == 2
    # the trial finished before the interruption was not trained again
    assert sorted(p.name for p in (done_first / "stage1").glob("checkpoint_*")) == checkpoints_before
