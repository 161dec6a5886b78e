"""Datasets: ranges, shapes, sharding, and the parquet / image-folder round trip through the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hdebm_ray.config import load_config
from hdebm_ray.data.datasets import DatasetError, Toy2D, batch_stream, build_dataset, cifar10_dataset, toy2d_centres


def test_digits_are_real_images_in_unit_range():
    for res, ch in [(16, 1), (32, 3)]:
        ds = build_dataset(load_config("digits", overrides=[f"data.resolution={res}", f"data.channels={ch}"]))
        x, y = ds[:]
        assert x.shape == (1797, ch, res, res) and x.min() >= -1 and x.max() <= 1
        assert x.min() < -0.99 and x.max() > 0.9  # the background is black and strokes saturate
        assert set(y.tolist()) == set(range(10))


def test_toy2d_mixtures_expose_their_centres():
    grid = toy2d_centres("grid")
    assert grid.shape == (25, 2) and grid.abs().max() <= 1
    ds = Toy2D("grid", 0.04, 5000)
    x, labels = ds[:]
    dist = (x - ds.centres[labels]).norm(dim=1)
    assert (dist < 4 * 0.04 * 1.5).float().mean() > 0.99  # 2-D Gaussian radius
    assert toy2d_centres("ring").shape == (8, 2)
    assert torch.allclose(toy2d_centres("ring").norm(dim=1), torch.full((8,), 0.8))


def test_batch_streams_shard_disjointly():
    ds = torch.utils.data.TensorDataset(torch.arange(100).float()[:, None], torch.arange(100))
    seen = []
    for rank in range(2):
        stream = batch_stream(ds, 10, rank=rank, world_size=2, seed=3)
        seen.append(torch.cat([next(stream)[1] for _ in range(5)]))  # one epoch of this rank's shard
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0
    assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 100


def test_image_folder_and_parquet_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = load_config(
        overrides=[
            "data.dataset=image_folder",
            f"data.path={tmp_path / 'imgs'}",
            "data.resolution=16",
            "data.channels=3",
        ]
    )
    ds = build_dataset(cfg)
    x, y = ds[4]
    assert len(ds) == 6 and x.shape == (3, 16, 16) and y == 1 and -1 <= x.min() and x.max() <= 1

    out = tmp_path / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hdebm_ray",
            "dataset",
            "convert",
            "--source",
            "image_folder",
            "--in",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--resolution",
            "16",
            "--channels",
            "3",
            "--shard-size",
            "4",
        ],
        check=True,
        capture_output=True,
    )
    assert len(list(out.glob("*.parquet"))) == 2
    pq_ds = build_dataset(cfg.replace(**{"data.dataset": "parquet", "data.path": str(out)}))
    assert len(pq_ds) == 6
    # written in a shuffled order; the index column says where each row came from
    source = [i for shard in pq_ds.shards for i in pq.read_table(shard).column("index").to_pylist()]
    assert sorted(source) == list(range(6)) and source != list(range(6))
    for i, j in enumerate(source):  # PNG is lossless: quantised images come back within one grey level
        assert torch.allclose(pq_ds[i][0], ds[j][0], atol=1.01 / 127.5) and pq_ds[i][1] == ds[j][1]


def test_digits_convert_to_parquet_via_cli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "hdebm_ray", "dataset", "convert", "--source", "digits", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    ds = build_dataset(load_config("digits", overrides=["data.dataset=parquet", f"data.path={tmp_path}"]))
    assert len(ds) == 1797 and ds[0][0].shape == (1, 16, 16)


def test_missing_data_fails_clearly(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(load_config(overrides=["data.dataset=image_folder", f"data.path={tmp_path / 'nope'}"]))
    with pytest.raises(DatasetError, match="no .parquet shards"):
        build_dataset(load_config(overrides=["data.dataset=parquet", f"data.path={tmp_path}"]))
    # cifar10 without download and without files: a clear message naming the folder (no network used)
    with pytest.raises(DatasetError, match=str(tmp_path)):
        cifar10_dataset(str(tmp_path), download=False)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "hdebm_ray",
            "pipeline",
            "--preset",
            "digits",
            "--set",
            "data.dataset=image_folder",
            "--set",
            f"data.path={tmp_path / 'nope'}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
