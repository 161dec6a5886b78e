"""The `ray job submit` path for real: a head started on 127.0.0.1 by cluster/local, jobs sent by jobs/*.sh.

A short digits pipeline must SUCCEED and leave checkpoints, TensorBoard events and sample grids in its run
directory; a long job must stop on `ray job stop` and leave nothing running; only the head this test started
is stopped at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import TINY, small_digits_overrides

ROOT = Path(__file__).resolve().parents[1]
RAY_CLUSTER_SINGLETONS = {"_AutoscalingCoordinatorActor"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(temp_dir: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", temp_dir], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    temp_dir = f"/tmp/ray-hdebm-test-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        # the job's `python` must be this interpreter (the head starts job drivers with its own PATH)
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",  # explicit: a loopback-only test cluster
        "DASHBOARD_PORT": str(free_port()),
        "GCS_PORT": str(free_port()),
        "RAY_TEMP_DIR": temp_dir,
    }
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    start = subprocess.run(
        [str(ROOT / "cluster" / "local"), "start", "--num-cpus=4"], env=env, capture_output=True, text=True
    )
    assert start.returncode == 0, start.stdout + start.stderr
    address = f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
    assert f"RAY_ADDRESS={address}" in start.stdout
    env["RAY_ADDRESS"] = address
    try:
        yield env
    finally:
        stop = subprocess.run([str(ROOT / "cluster" / "local"), "stop"], env=env, capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    for _ in range(50):
        if not session_processes(temp_dir):
            break
        time.sleep(0.2)
    assert session_processes(temp_dir) == [], "cluster/local stop left processes of its head running"


def job_client(env):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(env["RAY_ADDRESS"])


def submit(env, script: str, submission_id: str, args: list[str], extra_submit_args: str = ""):
    run_env = {**env, "SUBMISSION_ID": submission_id, "SUBMIT_ARGS": extra_submit_args}
    return subprocess.run(
        [str(ROOT / "jobs" / script), *args], env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_pipeline_job_succeeds_and_writes_its_run_directory(local_head, tmp_path):
    from ray.job_submission import JobStatus

    storage = str(tmp_path)
    # storage comes from HDEBM_STORAGE; the digits preset's eval actor scores Stage 1/2 (raw features in TINY)
    overrides = small_digits_overrides(storage, "jobrun")[1:] + TINY + [f"data.path={tmp_path / 'data'}"]
    args = ["--preset", "digits"] + [a for o in overrides for a in ("--set", o)]
    done = submit({**local_head, "HDEBM_STORAGE": storage}, "submit_pipeline.sh", "hdebm-ok", args)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.startswith("ray job submit --address http://127.0.0.1:")  # the exact command, printed
    assert job_client(local_head).get_job_status("hdebm-ok") == JobStatus.SUCCEEDED

    run = tmp_path / "jobrun"
    for stage in ("diffusion", "distill", "stage1", "stage2"):
        assert list((run / stage).glob("checkpoint_*/meta.json")), stage
        assert list((run / "tb" / stage).glob("events.out.tfevents.*")), stage
        assert (run / "samples" / f"{stage}.png").stat().st_size > 0
    assert (run / "pipeline.json").is_file() and (run / "config.yaml").is_file()
    scored = [json.loads(line)["stage"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert sorted(scored) == ["stage1", "stage1", "stage2", "stage2"]  # TINY: 2 checkpoints each


def test_long_job_stops_on_ray_job_stop_and_leaves_nothing_running(local_head, tmp_path):
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors, list_placement_groups

    client = job_client(local_head)
    overrides = small_digits_overrides(str(tmp_path), "long")[1:] + ["diffusion.steps=100000"]
    args = ["--preset", "digits"] + [a for o in overrides for a in ("--set", o)]
    sent = submit({**local_head, "HDEBM_STORAGE": str(tmp_path)}, "submit_pipeline.sh", "hdebm-long", args, "--no-wait")
    assert sent.returncode == 0, sent.stdout + sent.stderr

    deadline = time.time() + 300
    while "[diffusion] step" not in client.get_job_logs("hdebm-long"):  # training has really started
        assert client.get_job_status("hdebm-long") in (JobStatus.PENDING, JobStatus.RUNNING)
        assert time.time() < deadline, client.get_job_logs("hdebm-long")[-3000:]
        time.sleep(2)

    stop = subprocess.run(
        ["ray", "job", "stop", "--address", local_head["RAY_ADDRESS"], "hdebm-long"],
        env=local_head,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert client.get_job_status("hdebm-long") == JobStatus.STOPPED

    # Nothing left running: no live actor (controller, workers, bank) and no reserved placement group. Ray Train's
    # cluster-wide detached coordinator is Ray's own, shared by every job, and stays.
    address = local_head["RAY_ADDRESS"]
    deadline = time.time() + 120
    while True:
        actors = [
            a
            for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
            if a.class_name not in RAY_CLUSTER_SINGLETONS
        ]
        groups = list_placement_groups(address=address, filters=[("state", "!=", "REMOVED")])
        if not actors and not groups:
            break
        assert time.time() < deadline, (actors, groups)
        time.sleep(2)
