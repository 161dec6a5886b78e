"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``: a head and a second node, each with its own CPUs):
a Stage 1 whose two Train workers land one on each node, reading parquet shards through a file:// URI with Ray
Data and checkpointing (weights and bank snapshots) to storage both nodes see, finishes; a longer run of the same
name resumes at its last checkpoint, as on one node, and survives losing the second node mid-run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import helpers
import pytest
import ray
import torch
from helpers import TINY, RecordNode, small_digits_overrides

from hdebm_ray.checkpoint import load_config_of, load_meta, load_states
from hdebm_ray.config import load_config
from hdebm_ray.data import build_dataset
from hdebm_ray.dataset_convert import write_parquet_shards
from hdebm_ray.distributed.driver import fit_stage
from hdebm_ray.runner import run_in_process


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    # 3 CPUs a node and 2 a worker: the two workers cannot share a node, and each node keeps a CPU for Ray
    # Data's read / decode tasks. The third node is the spare that takes over when a worker's node is removed
    # (Cluster can add nodes only from the main thread, which is busy training then).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(helpers)
    ray.init(address=cluster.address, namespace="hdebm")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_stage1_on_two_nodes_streams_parquet_through_ray_data_and_resumes(two_nodes, tmp_path):
    shards = tmp_path / "shards"
    write_parquet_shards(build_dataset(load_config("digits")), str(shards), shard_size=500)
    overrides = small_digits_overrides(f"file://{tmp_path}/runs", "two") + TINY
    overrides += [
        "data.dataset=parquet",
        f"data.path=file://{shards}",
        "data.preprocess_cpus=1",
        "ray.num_workers=2",
        "ray.cpus_per_worker=2",
        "eval.actors=0",
    ]
    cfg = load_config("digits", overrides=overrides)
    # Stage 1 starts from a distilled generator: trained in process, from the same shards (the torch path).
    _, ck = run_in_process(cfg, "diffusion", tmp_path / "d")
    init = str(run_in_process(cfg, "distill", tmp_path / "k", init_dir=ck)[1])

    nodes = tmp_path / "nodes"
    nodes.mkdir()
    out = fit_stage(cfg, "stage1", init, report_hooks=[RecordNode(str(nodes))])
    meta = load_meta(out["checkpoint"])
    assert meta["done"] and meta["step"] == 4 and out["checkpoint"].startswith(f"file://{tmp_path}/runs/two/")
    placed = {(nodes / f"rank{r}").read_text() for r in (0, 1)}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(placed) == 2 and placed <= alive  # one worker on each of two nodes
    bank = tmp_path / "runs" / "two" / "stage1" / "bank"
    assert "bank_step_0000000004.arrow" in os.listdir(bank)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "two" / "tb" / "stage1"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("Data/train_batches")][-1] == 4  # every batch through Ray Data

    # A checkpoint is a directory of plain state_dicts + the resolved config, loadable with weights_only=True.
    ckpt = Path(out["checkpoint"].removeprefix("file://"))
    assert {"energy.pt", "generator.pt", "config.yaml", "meta.json"} <= {p.name for p in ckpt.iterdir()}
    states = load_states(ckpt)
    assert all(isinstance(v, torch.Tensor) for v in states["generator"].values())
    assert load_config_of(ckpt) == cfg

    # The same run, longer: resumes at step 4 on both nodes, with the bank of that checkpoint. Mid-run a worker's
    # node (not the head) is removed, its raylet and every process on it killed: the run restarts its workers
    # from the newest checkpoint, on the nodes left, with that checkpoint's bank.
    longer = cfg.replace(**{"stage1.steps": 10, "ray.max_failures": 2})
    stage_dir = tmp_path / "runs" / "two" / "stage1"
    lost = {}

    def remove_the_second_node():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(stage_dir.glob("checkpoint_00000006_*/meta.json")):
            time.sleep(0.05)  # checkpoint 6 registered: the restart resumes from it
        from ray.util.state import list_actors

        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        used = {a.node_id for a in list_actors(filters=alive, raise_on_missing_output=False)}
        node = next(n for n in two_nodes.worker_nodes if n.node_id in used)
        lost["node"] = node.node_id
        two_nodes.remove_node(node, allow_graceful=False)

    remover = threading.Thread(target=remove_the_second_node)
    remover.start()
    again = fit_stage(longer, "stage1", init, report_hooks=[RecordNode(str(nodes))])
    remover.join()
    meta2 = load_meta(again["checkpoint"])
    assert meta2["step"] == 10 and meta2["done"] and lost
    restores = meta2["summary"]["bank_restores"]
    assert restores[0] == {"checkpoint_step": 4, "bank_step": 4}  # the resume
    assert len(restores) == 2 and restores[1]["checkpoint_step"] == restores[1]["bank_step"] >= 6  # the restart
    assert meta2["summary"]["bank_audit"] == {"step": 10, "problems": []}
    placed = {(nodes / f"rank{r}").read_text() for r in (0, 1)}
    assert len(placed) == 2 and lost["node"] not in placed  # the last reports came from the nodes left
    states2 = load_states(again["checkpoint"].removeprefix("file://"))
    # Adam's step count carried on through both resumes: one step per training step
    assert int(states2["energy_opt"]["state"][0]["step"]) == 10
    assert all(v.isfinite().all() for v in states2["energy"].values() if v.is_floating_point())
