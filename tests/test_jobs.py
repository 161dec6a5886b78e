"""The `ray job submit` path for real: a head started on 127.0.0.1 by cluster/local, jobs sent by jobs/*.sh.

The head runs with token authentication (cluster/local's default): a submission or a Jobs API request without
the token is refused; with it, a short digits pipeline must SUCCEED and leave checkpoints, TensorBoard events
and sample grids in its run directory; a long job must stop on `ray job stop` and leave nothing running; only
the head this test started is stopped at the end.
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


def session_processes(pattern: str) -> list[str]:
    """'pid command' of every process whose command line matches ``pattern`` (e.g. names a head's state folder)."""
    out = subprocess.run(["pgrep", "-af", "--", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def head_ports() -> dict:
    """Every port a cluster/local head listens on, free: two heads on one machine share none."""
    return {key: str(free_port()) for key in ("DASHBOARD_PORT", "GCS_PORT", "CLIENT_PORT", "AGENT_PORT")}


AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    state = f"/tmp/hdebm-test-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        # the job's `python` must be this interpreter (the head starts job drivers with its own PATH)
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # token auth, cluster/local's default; the token file is this test's (cluster/local creates it)
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path_factory.mktemp("auth") / "token"),
        **head_ports(),
        "HDEBM_LOCAL_STATE": state,
    }
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    start = subprocess.run(
        [str(ROOT / "cluster" / "local"), "start", "--num-cpus=4"], env=env, capture_output=True, text=True
    )
    assert start.returncode == 0, start.stdout + start.stderr
    address = f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
    assert f"RAY_ADDRESS={address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in start.stdout
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert len(token.read_text()) == 64 and token.stat().st_mode & 0o077 == 0  # private to its owner
    env["RAY_ADDRESS"] = address
    try:
        yield env
    finally:
        stop = subprocess.run([str(ROOT / "cluster" / "local"), "stop"], env=env, capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    for _ in range(50):
        if not session_processes(state):
            break
        time.sleep(0.2)
    assert session_processes(state) == [], "cluster/local stop left processes of its head running"
    assert session_processes(f"ray.util.client.server.*--address=127.0.0.1:{env['GCS_PORT']}") == []


def job_client(env):
    """This process's Jobs API client, with the token in an explicit header: Ray reads RAY_AUTH_MODE once per
    process, and the earlier test modules set this one up without auth."""
    from ray.job_submission import JobSubmissionClient

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    return JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {token}"})


LIVE = """
import json, sys
from ray.util.state import list_actors, list_placement_groups
actors = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")])
groups = list_placement_groups(address=sys.argv[1], filters=[("state", "!=", "REMOVED")])
print(json.dumps({"actors": [[a.name or "", a.class_name] for a in actors], "groups": len(groups)}))
"""


def live(env) -> dict:
    """The head's live actors ([name, class]) and unremoved placement groups, asked from a process with the token
    (the state API's client has no header option)."""
    r = subprocess.run([sys.executable, "-c", LIVE, env["RAY_ADDRESS"]], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def submit(env, script: str, submission_id: str, args: list[str], extra_submit_args: str = ""):
    run_env = {**env, "SUBMISSION_ID": submission_id, "SUBMIT_ARGS": extra_submit_args}
    return subprocess.run(
        [str(ROOT / "jobs" / script), *args], env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_the_head_refuses_a_submission_or_request_without_the_token(local_head):
    import urllib.error
    import urllib.request

    anonymous = {k: v for k, v in local_head.items() if k not in AUTH}
    refused = subprocess.run(
        ["ray", "job", "submit", "--address", local_head["RAY_ADDRESS"], "--", "echo", "should-not-run"],
        env={**anonymous, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "should-not-run" not in refused.stdout
    assert "Missing authentication token" in refused.stdout + refused.stderr
    wrong = subprocess.run(
        ["ray", "job", "submit", "--address", local_head["RAY_ADDRESS"], "--", "echo", "should-not-run"],
        env={**anonymous, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr
    with pytest.raises(urllib.error.HTTPError) as denied:  # the Jobs API over HTTP, no header
        urllib.request.urlopen(f"{local_head['RAY_ADDRESS']}/api/jobs/", timeout=30)
    assert denied.value.code == 401
    token = Path(local_head["RAY_AUTH_TOKEN_PATH"]).read_text()
    request = urllib.request.Request(
        f"{local_head['RAY_ADDRESS']}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    assert urllib.request.urlopen(request, timeout=30).status == 200


def test_pipeline_job_succeeds_and_writes_its_run_directory(local_head, tmp_path):
    from ray.job_submission import JobStatus

    # A file:// storage URI takes the object-store path (pyarrow filesystems, as for s3:// and gs://) end to end:
    # checkpoints, chaining stages, bank snapshots, TensorBoard uploads, sample grids, eval results and
    # pipeline.json. Storage comes from HDEBM_STORAGE; the digits preset's eval actor scores Stage 1/2 (raw
    # features in TINY).
    storage = f"file://{tmp_path}"
    overrides = small_digits_overrides(storage, "jobrun")[1:] + TINY + [f"data.path={tmp_path / 'data'}"]
    args = ["--preset", "digits"] + [a for o in overrides for a in ("--set", o)]
    done = submit({**local_head, "HDEBM_STORAGE": storage}, "submit_pipeline.sh", "hdebm-ok", args)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.startswith("ray job submit --address http://127.0.0.1:")  # the exact command, printed
    assert job_client(local_head).get_job_status("hdebm-ok") == JobStatus.SUCCEEDED

    run = tmp_path / "jobrun"
    state = json.loads((run / "pipeline.json").read_text())
    assert list(state) == ["diffusion", "distill", "stage1", "stage2"]
    assert all(entry["checkpoint"].startswith(f"file://{run}/") for entry in state.values())
    distill = json.loads(Path(state["distill"]["checkpoint"].removeprefix("file://"), "meta.json").read_text())
    assert distill["done"] and [g["student_steps"] for g in distill["summary"]["distill_gaps"]] == [1]
    for stage in ("diffusion", "distill", "stage1", "stage2"):
        assert list((run / stage).glob("checkpoint_*/meta.json")), stage
        assert list((run / "tb" / stage).glob("events.out.tfevents.*")), stage
        assert (run / "samples" / f"{stage}.png").stat().st_size > 0
    assert (run / "config.yaml").is_file()
    # the bank actor snapshotted the bank next to each Stage 1 checkpoint
    assert sorted(p.name for p in (run / "stage1" / "bank").glob("*.arrow"))[-1] == "bank_step_0000000004.arrow"
    scored = [json.loads(line)["stage"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert sorted(scored) == ["stage1", "stage1", "stage2", "stage2"]  # TINY: 2 checkpoints each
    check_tensorboard(run)
    # no bank actor outlives its stage, no eval pool outlives the pipeline
    alive = live(local_head)["actors"]
    assert not [a for a in alive if a[0].startswith(("bank-jobrun", "eval-jobrun"))], alive

    # The same job again skips the finished stages and keeps their checkpoints.
    again = submit({**local_head, "HDEBM_STORAGE": storage}, "submit_pipeline.sh", "hdebm-again", args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert json.loads((run / "pipeline.json").read_text())["stage2"] == state["stage2"]
    logs = job_client(local_head).get_job_logs("hdebm-again")
    assert all(f"[pipeline] {stage}: already finished" in logs for stage in state), logs[-3000:]


def check_tensorboard(run: Path) -> None:
    """Every scalar group, the fixed-latent grids and Eval/fid at each checkpoint's images seen, read back with
    TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    groups = {
        "stage1": {"Loss", "Energy", "Langevin", "Bank", "Opt", "Timing"},
        "stage2": {"Loss", "Energy", "Langevin", "Opt", "Timing"},
    }
    for stage, expected in groups.items():
        acc = EventAccumulator(str(run / "tb" / stage), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars = acc.Tags()["scalars"]
        assert expected <= {t.split("/")[0] for t in scalars}, scalars
        assert {"Energy/data", "Energy/sample", "Energy/gap", "Langevin/drift_norm", "Langevin/clip_fraction"} <= set(
            scalars
        )
        assert {"Langevin/residual_norm", "Opt/lr_energy", "Opt/grad_norm_energy", "Timing/images_per_sec"} <= set(
            scalars
        )
        nimgs = sorted(json.loads(p.read_text())["nimg"] for p in (run / stage).glob("checkpoint_*/meta.json"))
        for tag in ("Samples/generator", "Samples/final", "Samples/ema"):
            assert [e.step for e in acc.Images(tag)] == nimgs  # one frame per checkpoint
        assert len(acc.Images("Samples/data")) == 1
        assert sorted(e.step for e in acc.Scalars("Eval/fid")) == nimgs
        assert sorted(e.step for e in acc.Scalars("Eval/fid_generator")) == nimgs


def test_long_job_stops_on_ray_job_stop_and_leaves_nothing_running(local_head, tmp_path):
    from ray.job_submission import JobStatus

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
    deadline = time.time() + 120
    while True:
        state = live(local_head)
        actors = [a for a in state["actors"] if a[1] not in RAY_CLUSTER_SINGLETONS]
        groups = state["groups"]
        if not actors and not groups:
            break
        assert time.time() < deadline, (actors, groups)
        time.sleep(2)


def test_a_second_users_head_starts_and_stops_beside_this_one_without_touching_it(local_head, tmp_path):
    """cluster/local keeps each user's head in their own state folder (mode 700) and stops only the processes it
    recorded at start, with their children: not a process that merely names its folder, not another user's head."""
    local = str(ROOT / "cluster" / "local")
    state_b = f"/tmp/hdebm-b-{uuid.uuid4().hex[:6]}"
    env_b = {**local_head, **head_ports(), "HDEBM_LOCAL_STATE": state_b}
    env_b["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "b" / "token")
    env_b.pop("RAY_ADDRESS")
    head_a = session_processes(local_head["HDEBM_LOCAL_STATE"])
    assert head_a
    run = lambda env, *args: subprocess.run([local, *args], env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    started = run(env_b, "start", "--num-cpus=1")
    decoy = None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert os.stat(state_b).st_mode & 0o777 == 0o700
        again = run(env_b, "start", "--num-cpus=1")  # the same user's second start on a running head
        assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "is running" in again.stderr
        # a process of this user that names B's temp folder but was not started by B's head: not B's to stop
        decoy = subprocess.Popen(["bash", "-c", f'exec -a "{state_b}/ray/session_latest decoy" sleep 600'])
        time.sleep(0.5)
        head_b = [p for p in session_processes(state_b) if "decoy" not in p]
        assert head_b and not set(head_b) & set(head_a)
        stopped = run(env_b, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        for _ in range(50):
            if not [p for p in session_processes(state_b) if "decoy" not in p]:
                break
            time.sleep(0.2)
        assert [p for p in session_processes(state_b) if "decoy" not in p] == []
        # the Ray Client server names the GCS, not the state folder: recorded at start, stopped too
        assert session_processes(f"ray.util.client.server.*--address=127.0.0.1:{env_b['GCS_PORT']}") == []
        assert decoy.poll() is None  # the decoy lives
        assert session_processes(local_head["HDEBM_LOCAL_STATE"]) == head_a  # user A's head untouched ...
        from ray.job_submission import JobStatus

        client = job_client(local_head)  # ... and still takes jobs
        probe = client.submit_job(entrypoint="true")
        deadline = time.time() + 120
        while not client.get_job_status(probe).is_terminal() and time.time() < deadline:
            time.sleep(0.5)
        assert client.get_job_status(probe) == JobStatus.SUCCEEDED
        assert "no head started" in run(env_b, "stop").stdout  # stopping twice is harmless
        if os.getuid() == 0:  # a state folder that belongs to another user is refused, not used
            os.chown(state_b, 65534, 65534)
            refused = run(env_b, "start")
            assert refused.returncode == 2 and "belongs to another user" in refused.stderr
    finally:
        run(env_b, "stop")
        if decoy is not None:
            decoy.kill()
