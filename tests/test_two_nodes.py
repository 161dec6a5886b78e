"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``: a head and a second node, each with its own CPUs):
a Stage 1 whose two Train workers land one on each node (``ray.placement_strategy: SPREAD``), reading parquet
shards through a file:// URI with Ray Data and checkpointing (weights and bank snapshots) to storage both nodes
see, survives losing the second node mid-run (restarted from its last checkpoint and that checkpoint's bank) and
finishes; and a preemption notice delivered the way Ray delivers it (a drain of a spot node with a deadline) costs
no step and no failure budget."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import pytest
import ray
import torch
from helpers import (
    TINY,
    HoldAfter,
    RecordNode,
    RecordSteps,
    RecordWorldSize,
    SlowAfter,
    newest_registered_step,
    small_digits_overrides,
)

from hdebm_ray.config import load_config
from hdebm_ray.data.convert import write_parquet_shards
from hdebm_ray.data.datasets import build_dataset
from hdebm_ray.distributed.driver import fit_stage
from hdebm_ray.io.checkpoint import load_config_of, load_meta, load_states
from hdebm_ray.training.runner import run_in_process


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    # 3 CPUs a node: SPREAD puts one worker (1 CPU) on each node, and the head alone still fits both workers and
    # a CPU for Ray Data's read / decode tasks once the second node is gone.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(helpers)
    ray.init(address=cluster.address, namespace="hdebm")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_stage1_on_two_nodes_streams_parquet_through_ray_data_and_survives_losing_a_node(two_nodes, tmp_path):
    shards = tmp_path / "shards"
    write_parquet_shards(build_dataset(load_config("digits")), str(shards), shard_size=500)
    overrides = small_digits_overrides(f"file://{tmp_path}/runs", "two") + TINY
    overrides += [
        "data.dataset=parquet",
        "data.loader=ray_data",  # 1797 digits would fit data.in_memory_mb: stream them as a big dataset would be
        f"data.path=file://{shards}",
        "data.preprocess_cpus=1",
        "ray.num_workers=2",
        "ray.placement_strategy=SPREAD",
        "eval.actors=0",
    ]
    cfg = load_config("digits", overrides=overrides)
    # Stage 1 starts from a distilled generator: trained in process, from the same shards (the torch path).
    _, ck = run_in_process(cfg, "diffusion", tmp_path / "d")
    init = str(run_in_process(cfg, "distill", tmp_path / "k", init_dir=ck)[1])

    # Mid-run, once checkpoint 4 is registered, the second node is removed: its raylet and every process on it
    # killed. The run restarts its workers from the newest checkpoint on the head, with that checkpoint's bank.
    # The ranks hold after report 4 until the node is gone: else the last steps can finish before the loss is
    # detected, and the "restart" resumes at step 8 with nothing left to train.
    cfg = cfg.replace(**{"stage1.steps": 8, "ray.max_failures": 2})
    stage_dir = tmp_path / "runs" / "two" / "stage1"
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    released = tmp_path / "node_removed"
    seen = {}

    def remove_a_worker_node():
        from ray.util.state import list_actors

        try:
            deadline = time.monotonic() + 300
            while newest_registered_step(stage_dir) < 4:  # registered: what the restart resumes from
                if time.monotonic() > deadline:
                    raise TimeoutError("no checkpoint 4")
                time.sleep(0.05)
            alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            seen["placed"] = {a.node_id for a in list_actors(filters=alive, raise_on_missing_output=False)}
            seen["newest_before"] = newest_registered_step(stage_dir)
            (node,) = two_nodes.worker_nodes
            seen["lost"] = node.node_id
            two_nodes.remove_node(node, allow_graceful=False)
        except Exception as err:  # seen by the assertions below, not lost in the thread
            seen["error"] = err
        finally:
            released.touch()

    remover = threading.Thread(target=remove_a_worker_node)
    remover.start()
    try:
        out = fit_stage(cfg, "stage1", init, report_hooks=[RecordNode(str(nodes)), HoldAfter(4, str(released))])
    finally:
        remover.join()
    assert "error" not in seen, seen.get("error")
    assert seen["newest_before"] < 8  # the node was lost mid-run
    meta = load_meta(out.checkpoint)
    assert meta["done"] and meta["step"] == 8 and out.checkpoint.startswith(f"file://{tmp_path}/runs/two/")
    assert len(seen["placed"]) == 2  # before the loss: one worker on each of two nodes
    placed = {(nodes / f"rank{r}").read_text() for r in (0, 1)}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert placed <= alive and seen["lost"] not in placed  # after: on the head
    (restore,) = meta["summary"]["bank_restores"]  # the restart, with the bank of the checkpoint it resumed from
    assert restore["checkpoint_step"] == restore["bank_step"] >= 4
    assert meta["summary"]["bank_audit"] == {"step": 8, "problems": []}
    assert f"bank_step_{8:010d}.arrow" in os.listdir(stage_dir / "bank")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "two" / "tb" / "stage1"))
    acc.Reload()
    # every batch since the restart through Ray Data
    assert [e.value for e in acc.Scalars("Data/train_batches")][-1] == 8 - restore["checkpoint_step"]

    # A checkpoint is a directory of plain state_dicts + the resolved config, loadable with weights_only=True.
    ckpt = Path(out.checkpoint.removeprefix("file://"))
    assert {"energy.pt", "generator.pt", "config.yaml", "meta.json"} <= {p.name for p in ckpt.iterdir()}
    states = load_states(ckpt)
    assert all(isinstance(v, torch.Tensor) for v in states["generator"].values())
    assert load_config_of(ckpt) == cfg
    # Adam's step count carried on through the restart: one step per training step
    assert int(states["energy_opt"]["state"][0]["step"]) == 8
    assert all(v.isfinite().all() for v in states["energy"].values() if v.is_floating_point())


def test_a_preemption_notice_checkpoints_at_the_current_step_and_resumes_there_off_the_failure_budget(
    two_nodes, tmp_path
):
    """A spot node (labelled ray.io/market-type=spot, as cluster/ labels its spot groups) holds one of two workers;
    mid-Stage-1 it is drained with a deadline, as the autoscaler does for a spot reclaim (`ray drain-node
    --reason DRAIN_NODE_REASON_PREEMPTION`). The ranks see the notice at their next check, checkpoint at that step
    (the bank's snapshot with it) and hold; at the deadline Ray Train restarts the group on the head (a drained
    node takes no new workers), which resumes from exactly there, with
    ray.max_failures = 0: the preemption did not spend the ordinary failure budget. The bank actor never sat on
    the spot node."""
    for node in list(two_nodes.worker_nodes):  # left by an earlier test of the module: the head and one node only
        two_nodes.remove_node(node)
    spot = two_nodes.add_node(num_cpus=3, labels={"ray.io/market-type": "spot"})
    two_nodes.wait_for_nodes()
    init = helpers.distilled_digits(tmp_path / "distilled")
    overrides = small_digits_overrides(str(tmp_path / "runs"), "spot") + TINY
    overrides += [
        "stage1.steps=40",
        "stage1.report_every=2",
        "stage1.checkpoint_every=40",  # no checkpoint but the preemption's before the end
        "run.interrupt_check_every=1",
        "ray.num_workers=2",
        "ray.placement_strategy=SPREAD",
        "ray.max_failures=0",
        "ray.preemption_grace_s=0",
        "eval.actors=0",
    ]
    cfg = load_config("digits", overrides=overrides)
    stage_dir = tmp_path / "runs" / "spot" / "stage1"
    steps = tmp_path / "steps"
    steps.mkdir()
    seen = {}

    def reported() -> int:
        lines = (steps / "rank0.steps").read_text().split() if (steps / "rank0.steps").exists() else []
        return max(map(int, lines[1::2]), default=0)

    def preempt():
        from ray.util.state import list_actors

        try:
            deadline = time.monotonic() + 300
            while reported() < 6:
                if time.monotonic() > deadline:
                    raise TimeoutError("no step 6")
                time.sleep(0.05)
            bank = list_actors(filters=[("class_name", "=", "BankActor"), ("state", "=", "ALIVE")])
            seen["bank_nodes"] = {a.node_id for a in bank}
            drain = [
                str(Path(sys.executable).parent / "ray"), "drain-node", "--address", two_nodes.address,
                "--node-id", spot.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message", "spot instance reclaimed (test)", "--deadline-remaining-seconds", "15",
            ]  # fmt: skip
            seen["drain"] = subprocess.run(drain, capture_output=True, text=True, timeout=60)
            while newest_registered_step(stage_dir) == 0:  # the preemption checkpoint, registered
                if time.monotonic() > deadline:
                    raise TimeoutError("no preemption checkpoint")
                time.sleep(0.05)
            seen["checkpointed"] = newest_registered_step(stage_dir)
        except Exception as err:  # seen by the assertions below, not lost in the thread
            seen["error"] = err

    preempter = threading.Thread(target=preempt)
    preempter.start()
    try:
        # Ray Train's watcher polls the drain state every 5 s: the steps after 6 are slowed so the run outlasts it
        out = fit_stage(cfg, "stage1", init, report_hooks=[RecordSteps(str(steps)), SlowAfter(6, 1.0)])
    finally:
        preempter.join()
        two_nodes.remove_node(spot, allow_graceful=False)  # the cloud takes the drained node
    assert "error" not in seen, seen.get("error")
    assert seen["drain"].returncode == 0, seen["drain"].stderr
    head = two_nodes.head_node.node_id
    assert seen["bank_nodes"] == {head}  # the bank actor is kept off the spot node
    meta = load_meta(out.checkpoint)
    assert meta["done"] and meta["step"] == 40
    at = seen["checkpointed"]
    assert 6 <= at < 40 and meta["resumed_from_step"] == at  # resumed from the preemption checkpoint
    lines = [line.split() for line in (steps / "rank0.steps").read_text().splitlines()]
    first_pid = lines[0][0]
    before = [int(s) for pid, s in lines if pid == first_pid]
    assert max(before) == at  # every step trained before the preemption is in its checkpoint: none lost
    assert min(int(s) for pid, s in lines if pid != first_pid) == (at // 2 + 1) * 2  # the next report tick after
    assert meta["summary"]["bank_restores"] == [{"checkpoint_step": at, "bank_step": at}]
    assert meta["summary"]["bank_audit"] == {"step": 40, "problems": []}


def test_an_elastic_group_goes_on_with_the_workers_left_and_keeps_the_global_batch(two_nodes, tmp_path):
    """ray.elastic_min_workers = 1 of 2 workers (2 CPUs each: one fits the head, one a second node). The second
    node is lost mid-run; the group restarts with the one worker that fits, from the last checkpoint, and trains
    the same global batch (that worker takes all of it) to the end."""
    for node in list(two_nodes.worker_nodes):  # left by an earlier test of the module: the head and one node only
        two_nodes.remove_node(node)
    extra = two_nodes.add_node(num_cpus=2)
    two_nodes.wait_for_nodes()
    init = helpers.distilled_digits(tmp_path / "distilled")
    # an elastic group starts with the workers that fit at that moment: wait until both do (the new node's CPUs
    # reported, the earlier tests' actors gone from the head), or it may start with one and never lose a node
    helpers.wait_for(lambda: ray.available_resources().get("CPU", 0) >= 5, "5 free CPUs: the head's 3 and the node's 2")
    # ... as Ray Train sees it: through Ray's detached autoscaling coordinator, whose view of the nodes an earlier
    # test's Ray Data run started and which refreshes only every 20 s. A fresh one reads the nodes as they are now.
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator"))
    overrides = small_digits_overrides(str(tmp_path / "runs"), "elastic") + TINY
    overrides += [
        "stage1.steps=16",
        "stage1.report_every=2",
        "stage1.checkpoint_every=4",
        "ray.num_workers=2",
        "ray.cpus_per_worker=2",
        "ray.elastic_min_workers=1",
        "ray.max_failures=1",
        "eval.actors=0",
    ]
    cfg = load_config("digits", overrides=overrides)
    stage_dir = tmp_path / "runs" / "elastic" / "stage1"
    record = tmp_path / "record"
    record.mkdir()
    released = tmp_path / "released"

    def lose_the_node():
        deadline = time.monotonic() + 300
        while newest_registered_step(stage_dir) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        two_nodes.remove_node(extra, allow_graceful=True)  # without notice (no drain): a real failure
        released.touch()

    loser = threading.Thread(target=lose_the_node)
    loser.start()
    try:
        hooks = [RecordWorldSize(str(record)), HoldAfter(4, str(released))]
        out = fit_stage(cfg, "stage1", init, report_hooks=hooks)
    finally:
        loser.join()
    meta = load_meta(out.checkpoint)
    assert meta["done"] and meta["step"] == 16
    sizes = [tuple(map(int, line.split())) for line in (record / "world").read_text().splitlines()]
    assert sizes[0][1] == 2 and sizes[-1] == (16, 1), sizes  # two workers, then the one left
    assert meta["nimg"] == 16 * cfg.stage1.batch_size  # the global batch kept with one worker
    assert meta["summary"]["bank_audit"] == {"step": 16, "problems": []}
