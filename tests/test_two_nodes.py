"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``: a head and a second node, each with its own CPUs):
a Stage 1 whose two Train workers land one on each node (``ray.placement_strategy: SPREAD``), reading parquet
shards through a file:// URI with Ray Data and checkpointing (weights and bank snapshots) to storage both nodes
see, survives losing the second node mid-run (restarted from its last checkpoint and that checkpoint's bank) and
finishes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import helpers
import pytest
import ray
import torch
from helpers import TINY, HoldAfter, RecordNode, newest_registered_step, small_digits_overrides

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
