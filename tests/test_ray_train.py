"""Real Ray Train runs: 2 gloo workers on digits, the replay-buffer baselines (M-JEM through Ray Data), checkpoints
written by rank 0 only. The whole pipeline on file:// storage: test_jobs; resuming at the saved step: test_two_nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, small_digits_overrides

from hdebm_ray.config import load_config
from hdebm_ray.data.convert import png_bytes
from hdebm_ray.data.datasets import build_dataset
from hdebm_ray.distributed.driver import fit_stage
from hdebm_ray.distributed.ray_data import uses_ray_data
from hdebm_ray.evaluation.sampling import Sampler
from hdebm_ray.io.checkpoint import load_meta, load_states


# M-EBM is M-JEM without the classifier batch: M-JEM's run covers its code path on Ray (and test_baselines /
# test_toy2d_learning train M-EBM itself in process).
@pytest.mark.parametrize("stage", ["mjem", "icd"])
def test_baseline_trains_with_two_workers_on_the_replay_buffer_actor(ray_local, tmp_path, stage):
    # Real DDP (gloo) over 2 Ray Train workers: M-JEM's two-headed forward and Improved CD's KL term, whose
    # gradient reaches θ outside DDP's forward, must both leave the ranks with identical weights. M-JEM reads an
    # image folder through Ray Data: two streams (EBM and classifier batches) split across the ranks, labels from
    # the class folders, and the p0 fit streamed from the files (test_two_nodes reads parquet).
    data = [f"data.path={tmp_path / 'data'}"]
    if stage == "mjem":
        write_image_folder(build_dataset(load_config("digits")), tmp_path / "data")
        data += ["data.dataset=image_folder", "data.loader=ray_data", "data.shuffle_buffer=64"]
        data += ["data.preprocess_cpus=0.5"]
        data += ["mjem.num_classes=10"]
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), stage) + TINY + data)
    assert uses_ray_data(cfg) == (stage == "mjem")
    out = fit_stage(cfg, stage)
    meta = load_meta(out.checkpoint)
    assert meta["done"] and meta["step"] == 4
    chain_init = load_states(out.checkpoint, ["chain_init"])["chain_init"]
    if stage == "icd":  # chains start from U[-1, 1]: nothing to fit
        assert chain_init == {}
    else:  # the fitted p0 rides in the checkpoint as plain tensors
        assert chain_init["mean"].shape == (256,) and chain_init["factor"].shape == (256, 256)
    # the replay buffer actor snapshotted its chains next to each checkpoint
    run = Path(tmp_path) / stage
    assert sorted(p.name for p in (run / stage / "bank").glob("*.arrow")) == [
        "bank_step_0000000002.arrow",
        "bank_step_0000000004.arrow",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb" / stage))
    acc.Reload()
    expected = {
        # Data/: what arrived through Ray Data, by stream
        "mjem": {"Loss/classifier", "Classifier/accuracy", "Data/train_batches", "Data/labelled_batches"},
        "icd": {"Loss/kl", "Loss/nn_entropy"},
    }
    assert {"Loss/energy", "Bank/reinit_fraction", "Langevin/drift_norm"} | expected[stage] <= set(
        acc.Tags()["scalars"]
    )
    if stage == "mjem":  # 4 steps of 8 images per rank from each stream: all through Ray Data
        assert [e.value for e in acc.Scalars("Data/train_batches")][-1] == 4
    # Samples with the stage's own sampler from the saved checkpoint.
    x, starts = Sampler(out.checkpoint).sample_with_start(8, seed=0)
    assert x.shape == starts.shape == (8, 1, 16, 16) and bool(torch.isfinite(x).all())
    assert not torch.equal(x, starts)  # the chain starts (scored as fid_init) are not the samples


def write_image_folder(dataset, root: Path) -> None:
    """Every item of ``dataset`` as ``root/<label>/<index>.png``."""
    for i in range(len(dataset)):
        x, y = dataset[i]
        (root / str(int(y))).mkdir(parents=True, exist_ok=True)
        (root / str(int(y)) / f"{i:05d}.png").write_bytes(png_bytes(x))


def test_stage1_step_in_process_equals_the_step_in_a_one_worker_trainer(ray_local, tmp_path):
    import torch

    from hdebm_ray.training.runner import run_in_process

    cfg = load_config(
        "digits",
        overrides=small_digits_overrides(str(tmp_path), "same")
        + TINY
        + ["ray.num_workers=1", "stage1.steps=1", "stage1.report_every=1", "stage1.checkpoint_every=1"],
    )
    _, ck = run_in_process(cfg, "diffusion", tmp_path / "d")
    _, ck = run_in_process(cfg, "distill", tmp_path / "k", init_dir=ck)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker, so both sides sum in the same order
    try:
        _, local = run_in_process(cfg, "stage1", tmp_path / "local", init_dir=ck)
    finally:
        torch.set_num_threads(threads)
    remote = fit_stage(cfg, "stage1", str(ck)).checkpoint
    a, b = load_states(local), load_states(remote)
    for net in ("energy", "generator"):
        for key, value in a[net].items():
            assert torch.allclose(value, b[net][key], atol=1e-6, rtol=1e-5), (net, key)
    fresh = run_in_process(cfg.replace(**{"run.seed": 1}), "stage1", tmp_path / "other", init_dir=ck)[1]
    c = load_states(fresh)
    assert any(not torch.allclose(v, c["energy"][k]) for k, v in a["energy"].items())  # the comparison can fail


def test_ray_data_streams_a_folder_without_a_log_line_per_epoch_and_auto_keeps_a_small_one_in_memory(
    ray_local, tmp_path
):
    """A 100-image folder: under ``data.loader: auto`` it fits ``data.in_memory_mb`` and is decoded once into memory
    (no Ray Data); forced through Ray Data by the CLI (against this module's Ray, as a driver of its own), several
    epochs pass without Ray Data's per-epoch "execution finished" lines or a deprecation warning in the log."""
    import subprocess
    import sys

    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hdebm_ray.data.datasets import DecodedImages, training_dataset

    digits = build_dataset(load_config("digits"))
    write_image_folder(torch.utils.data.Subset(digits, range(100)), tmp_path / "data")
    data = ["data.dataset=image_folder", f"data.path={tmp_path / 'data'}"]
    small = load_config("digits", overrides=data)
    assert not uses_ray_data(small) and isinstance(training_dataset(small), DecodedImages)
    assert len(training_dataset(small)) == 100 and training_dataset(small) is training_dataset(small)  # decoded once
    assert uses_ray_data(small.replace(**{"data.in_memory_mb": 0}))

    overrides = small_digits_overrides(str(tmp_path), "folder") + data + ["data.loader=ray_data"]
    overrides += ["diffusion.steps=16", "diffusion.batch_size=16", "diffusion.report_every=4", "eval.actors=0"]
    overrides += ["diffusion.checkpoint_every=16", "data.preprocess_cpus=0.5"]
    cmd = [sys.executable, "-m", "hdebm_ray", "train", "--stage", "diffusion", "--preset", "digits"]
    cmd += ["--address", ray.get_runtime_context().gcs_address] + [a for o in overrides for a in ("--set", o)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    acc = EventAccumulator(str(tmp_path / "folder" / "tb" / "diffusion"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("Data/train_epochs")][-1] >= 2  # 100 images, 6 batches of 8 a rank
    assert "execution finished" not in log and "RayDeprecationWarning" not in log
    assert log.count("[diffusion] step") == 4


def test_a_node_with_other_software_than_the_driver_is_refused_in_one_line(ray_local, tmp_path, monkeypatch):
    """The driver's software fingerprint travels with the job; a Train worker and an eval actor whose own differs
    (here: the driver claims another torch, as a node that installed a newer one would look) refuse before any work."""
    import ray

    from hdebm_ray.config import ConfigError
    from hdebm_ray.distributed import driver
    from hdebm_ray.distributed.eval_pool import EvalActor
    from hdebm_ray.io.software import SoftwareMismatch, software_fingerprint

    mine = software_fingerprint()
    other = {**mine, "torch": "0.0.1"}
    monkeypatch.setattr(driver, "software_fingerprint", lambda: other)
    cfg = load_config(
        "digits", overrides=small_digits_overrides(str(tmp_path), "other") + TINY + ["ray.max_failures=0"]
    )
    with pytest.raises(ConfigError) as err:
        fit_stage(cfg, "diffusion")
    message = str(err.value)
    assert "\n" not in message and f"torch {mine['torch']} where the run's driver runs 0.0.1" in message, message
    assert "a train worker on node" in message
    assert not list((tmp_path / "other" / "diffusion").glob("**/checkpoint_0*"))  # refused before any step

    actor = EvalActor.remote(None, {**mine, "hdebm_ray": "0123456789abcdef"})  # another commit of this package
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(actor.evaluate.remote(str(tmp_path / "none"), 1, 0, {}), timeout=120)
    assert isinstance(err.value.cause, SoftwareMismatch) and "code (a digest of hdebm_ray's sources)" in str(err.value)
    ray.kill(actor)
