"""Runs on a shared Ray, as users run them: one owner per run (a second driver on a running run is refused in one line
and the first goes on unharmed; two runs of one preset side by side keep their own actors and files), a driver's
lease taken over from a dead driver, SIGTERM to the driver turned into a checkpoint at the current step and a resume
from it, and deadlines: a hung eval actor and a hung bank call end within what is configured, in one line each."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray
from helpers import TINY, cli_command, distilled_digits, small_digits_overrides, wait_for

from hdebm_ray.bank.service import Bank
from hdebm_ray.bank.store import SlotStore, snapshot_name
from hdebm_ray.config import load_config
from hdebm_ray.evaluation.results import read_results
from hdebm_ray.io.checkpoint import load_meta, newest_checkpoint, registered_names
from hdebm_ray.io.ownership import OWNER_FILE, RunInUse, RunLease, run_id


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return distilled_digits(tmp_path_factory.mktemp("distilled"))


def stage1_command(root: Path, name: str, init: str, *extra: str) -> list[str]:
    overrides = small_digits_overrides(str(root), name) + TINY + ["ray.num_workers=1", *extra]
    address = ray.get_runtime_context().gcs_address
    return cli_command("train", "--stage", "stage1", "--preset", "digits", "--init-from", init, overrides=overrides,
                       address=address)  # fmt: skip


def test_one_owner_per_run_and_runs_of_one_preset_side_by_side(ray_local, distilled, tmp_path):
    """Driver A trains; driver B, the same command, is refused in one line naming A and leaves A unharmed; driver C,
    the same preset under another name, runs beside A with its own bank actor, eval pool, checkpoints and results."""
    scored = ["eval.actors=1", "eval.stages=[stage1]", "eval.features=raw", "ray.checkpoints_to_keep=20"]
    common = ["stage1.steps=24", "stage1.report_every=2", "stage1.checkpoint_every=4", *scored]
    logs = {k: open(tmp_path / f"{k}.log", "w") for k in "ABC"}  # noqa: SIM115 - closed below
    a = subprocess.Popen(
        stage1_command(tmp_path, "shared", distilled, *common), stdout=logs["A"], stderr=subprocess.STDOUT
    )
    run_a, run_c = tmp_path / "shared", tmp_path / "other"
    wait_for(lambda: (run_a / OWNER_FILE).is_file() and (run_a / "stage1").is_dir(), "driver A to start training")
    b = subprocess.run(
        stage1_command(tmp_path, "shared", distilled, *common), capture_output=True, text=True, timeout=120
    )
    c = subprocess.Popen(
        stage1_command(tmp_path, "other", distilled, *common), stdout=logs["C"], stderr=subprocess.STDOUT
    )
    # both run at once, each with its own actors, named after its run id
    # each run created its own identity (nobody here creates one)
    wait_for(lambda: (run_c / "run.json").is_file(), "driver C's run identity")
    ids = {run: run_id(str(tmp_path / run), create=False) for run in ("shared", "other")}
    assert ids["shared"] != ids["other"]
    wanted = {
        f"bank-{ids['shared']}-stage1",
        f"bank-{ids['other']}-stage1",
        f"eval-{ids['shared']}",
        f"eval-{ids['other']}",
    }
    wait_for(
        lambda: wanted <= {x["name"] for x in ray.util.list_named_actors(all_namespaces=True)}, "both runs' actors"
    )
    assert a.wait(timeout=600) == 0 and c.wait(timeout=600) == 0
    for log in logs.values():
        log.close()

    # B: one line, naming the run and the driver that owns it; nothing else
    assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr
    (line,) = [ln for ln in b.stderr.splitlines() if ln.strip()]
    assert line.startswith(
        f"hdebm-ray: error: run {run_a} is in use by another driver (pid {a.pid} on {socket.gethostname()}"
    )
    # A and C unharmed: every step's slots written once each, and each eval.jsonl holds exactly its own checkpoints
    for run in (run_a, run_c):
        final = load_meta(newest_checkpoint(str(run / "stage1")))
        assert final["done"] and final["step"] == 24
        assert final["summary"]["bank_audit"] == {"step": 24, "problems": []}
        store, _ = SlotStore.load(str(run / "stage1" / "bank" / snapshot_name(24)))
        bank = Bank(store.size, store.shapes)
        bank.load_store(store)
        assert bank.audit(24, 16) == []
        mine = {str(run / "stage1" / n) for n in registered_names(str(run / "stage1"))}
        scored_here = [r["checkpoint"] for r in read_results(str(run))]
        assert sorted(scored_here) == sorted(mine) and len(mine) == 6  # one result per checkpoint, none of the other's
    assert not (run_a / OWNER_FILE).exists()  # released at the end


def test_a_dead_drivers_lease_is_taken_over_and_a_live_one_is_not(tmp_path, capsys):
    """The lease without Ray: a fresh lease held elsewhere refuses; an expired one, or one whose holder on this host
    is gone, is taken over (saying whose); the holder that lost its lease knows it at its next heartbeat."""
    location = str(tmp_path / "run")
    os.makedirs(location)
    owner = tmp_path / "run" / OWNER_FILE

    def held_by(host: str, pid: int, beat_ago: float) -> None:
        now = time.time()
        record = {"token": "x", "host": host, "pid": pid, "job_id": "raysubmit_1", "started_at": now - 100}
        owner.write_text(json.dumps({**record, "heartbeat_at": now - beat_ago}))

    held_by("elsewhere", 1, beat_ago=5)
    with pytest.raises(RunInUse, match=r"in use by another driver \(pid 1 on elsewhere, Ray job raysubmit_1"):
        RunLease(location, lease_s=60).acquire()
    held_by("elsewhere", 1, beat_ago=120)  # expired
    RunLease(location, lease_s=60).acquire().release()
    assert "took over run" in capsys.readouterr().out and not owner.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    held_by(socket.gethostname(), dead.pid, beat_ago=1)  # fresh, but its process is gone
    lease = RunLease(location, lease_s=6).acquire()
    held_by("elsewhere", 2, beat_ago=0)  # another driver took it meanwhile
    wait_for(lambda: lease.lost.is_set(), "the heartbeat to notice", timeout_s=10)
    lease.release()
    assert owner.exists()  # the other driver's lease is left alone


def test_sigterm_to_the_driver_checkpoints_at_the_current_step_and_the_same_command_resumes(
    ray_local, distilled, tmp_path
):
    extra = ["stage1.steps=60", "stage1.report_every=2", "stage1.checkpoint_every=60", "run.interrupt_check_every=2"]
    cmd = stage1_command(tmp_path, "term", distilled, *extra, "eval.actors=0")
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: "[stage1] step 10/60" in log_path.read_text(), "ten steps")
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=300) == 143
    text = log_path.read_text()
    seen = max(int(x.split("/")[0]) for x in text.split("[stage1] step ")[1:])  # the last step a rank reported
    stopped = [ln for ln in text.splitlines() if ln.startswith("hdebm-ray: stopped:")]
    assert len(stopped) == 1 and "SIGTERM to the driver" in stopped[0] and "the same command resumes" in stopped[0]
    saved = load_meta(newest_checkpoint(str(tmp_path / "term" / "stage1")))
    assert saved["step"] == seen and not saved["done"]  # checkpointed where the ranks stopped: nothing trained is lost
    assert not (tmp_path / "term" / "stop.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    final = load_meta(newest_checkpoint(str(tmp_path / "term" / "stage1")))
    assert final["done"] and final["resumed_from_step"] == saved["step"]
    assert final["summary"]["bank_restores"][-1] == {"checkpoint_step": saved["step"], "bank_step": saved["step"]}


class HangTheBank:
    """A report hook: once, at ``step`` on rank 0, the bank actor's one thread is made to sleep (a stuck actor)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def __call__(self, rank: int, step: int) -> None:
        if rank == 0 and step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("bank-"))
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            handle.__ray_call__.remote(lambda self: time.sleep(600))


def test_a_hung_bank_call_and_a_hung_evaluation_end_within_their_deadlines_in_one_line(
    ray_local, distilled, tmp_path, capfd
):
    from hdebm_ray.distributed.driver import fit_stage, running_eval_pool

    # the bank: stuck after step 2; every call waits at most 3 s, then the bank is restarted and the run resumes
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "stuck") + TINY + [
        "stage1.steps=6", "ray.num_workers=1", "ray.bank_timeout_s=3", "ray.max_failures=1"])  # fmt: skip
    started = time.monotonic()
    out = fit_stage(cfg, "stage1", distilled, report_hooks=[HangTheBank(2, str(tmp_path / "hung"))])
    assert time.monotonic() - started < 120
    meta = load_meta(out.checkpoint)
    assert meta["done"] and meta["summary"]["bank_restores"] == [{"checkpoint_step": 2, "bank_step": 2}]
    captured = capfd.readouterr()
    said = captured.out + captured.err
    assert "did not answer within ray.bank_timeout_s = 3 s" in said

    # the eval pool: every evaluation hangs; each is given up after eval.timeout_s, tried once more, then named
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "slow") + TINY + [
        "eval.actors=1", "eval.stages=[diffusion]", "eval.features=raw", "eval.timeout_s=4", "diffusion.steps=4",
        "ray.checkpoints_to_keep=4"])  # fmt: skip
    started = time.monotonic()
    with running_eval_pool(cfg, hold_until=str(tmp_path / "never")) as pool:
        fit_stage(cfg, "diffusion", eval_pool=pool)
    assert time.monotonic() - started < 150
    said = capfd.readouterr().out
    failures = [ln for ln in said.splitlines() if "not scored:" in ln]
    checkpoints = registered_names(str(tmp_path / "slow" / "diffusion"))
    assert len(failures) == len(checkpoints) == 2  # one line per checkpoint, saying why
    assert all("timed out twice (eval.timeout_s = 4 s)" in ln for ln in failures), failures
    assert read_results(str(tmp_path / "slow")) == []
