"""Bounded-memory data paths, without Ray: streamed moments against the batch computation, the reservoir's
uniformity, Frequent Directions' error bound, the streamed p0 fit against the in-memory one, parquet / image
folders behind a file:// URI read lazily with bad rows named, FID against streamed reference statistics, and
``dataset convert``'s refusal to mix two datasets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hdebm_ray.config import load_config
from hdebm_ray.core.gaussian_init import fit_gaussian, fit_gaussian_stream
from hdebm_ray.core.moments import FrequentDirections, Reservoir, RunningMoments
from hdebm_ray.data.convert import OutputExists, write_parquet_shards
from hdebm_ray.data.datasets import build_dataset, iter_batches, random_items, unit_to_uint8
from hdebm_ray.data.files import DatasetError
from hdebm_ray.evaluation.fid import FeatureSpace


@pytest.fixture(scope="module")
def digits():
    return build_dataset(load_config("digits"))


@pytest.fixture(scope="module")
def shards(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("pq") / "digits"
    write_parquet_shards(digits, str(out), shard_size=500, shuffle=False)  # the source's order, to compare
    return out


def test_streamed_moments_equal_the_batch_computation_to_1e8_relative():
    rng = np.random.default_rng(0)
    # a large common offset: a sum-of-squares formula would lose about 8 digits to cancellation here
    x = rng.normal(size=(3001, 40)) @ rng.normal(size=(40, 40)) + 1e4
    m = RunningMoments(40)
    for chunk in np.array_split(x, [1, 7, 500, 1500, 1501]):  # uneven batches, one of a single row
        m.update(chunk)
    assert m.count == 3001
    cov = np.cov(x, rowvar=False)
    assert np.abs(m.mean.numpy() - x.mean(0)).max() <= 1e-8 * np.abs(x.mean(0)).max()
    assert np.abs(m.covariance.numpy() - cov).max() <= 1e-8 * np.abs(cov).max()
    diag = RunningMoments(40, full=False)
    for chunk in np.array_split(x, 9):
        diag.update(chunk)
    assert np.abs(diag.variance.numpy() - cov.diagonal()).max() <= 1e-8 * cov.diagonal().max()


def test_reservoir_keeps_every_row_with_equal_probability():
    n, capacity, trials = 60, 12, 3000
    counts = np.zeros(n)
    for t in range(trials):
        r = Reservoir(capacity, seed=t)
        for chunk in np.array_split(np.arange(n)[:, None], [5, 6, 30]):
            r.update(chunk)
        kept = r.samples[:, 0]
        assert len(kept) == capacity and len(set(kept.tolist())) == capacity
        counts[kept] += 1
    p = capacity / n
    assert np.abs(counts / trials - p).max() < 5 * (p * (1 - p) / trials) ** 0.5


def test_frequent_directions_meets_its_error_bound():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 30)) * np.linspace(5, 0.1, 30)
    fd = FrequentDirections(30, rows=10)
    for chunk in np.array_split(x, 37):
        fd.update(chunk)
    b = fd.sketch.numpy()
    assert b.shape[0] <= 10
    err = np.linalg.norm(x.T @ x - b.T @ b, 2)
    s = np.linalg.svd(x, compute_uv=False)
    for k in range(10):
        assert err <= (s[k:] ** 2).sum() / (10 - k) * (1 + 1e-9)


def test_streamed_p0_fit_matches_the_in_memory_fit(digits):
    x = torch.stack([digits[i][0] for i in range(len(digits))])  # 1797 × 256
    full = fit_gaussian(x, max_full_dim=4096)
    streamed, n = fit_gaussian_stream(x.split(100), max_full_dim=4096)
    assert n == len(x) and streamed.shape == full.shape
    assert (streamed.mean - full.mean).abs().max() < 1e-12
    assert (streamed.covariance - full.covariance).abs().max() < 1e-10
    # Above max_full_dim: rank 32 + diagonal. Every pixel's variance is kept exactly; the leading directions
    # carry the same spectrum as the randomised SVD of the data in memory, and the whole covariance is as close.
    low = fit_gaussian(x, max_full_dim=100, rank=32)
    low_s, _ = fit_gaussian_stream(x.split(100), max_full_dim=100, rank=32)
    cov = torch.cov(x.flatten(1).double().T)
    assert torch.allclose(low_s.covariance.diagonal(), cov.diagonal(), rtol=1e-9, atol=2e-12)  # constant pixels: 1e-12
    assert low_s.factor.shape == (256, 32)
    top = torch.linalg.eigvalsh(low.factor @ low.factor.T).flip(0)[:16]
    top_s = torch.linalg.eigvalsh(low_s.factor @ low_s.factor.T).flip(0)[:16]
    assert ((top_s - top).abs() / top).max() < 0.02
    err, err_s = ((m.covariance - cov).norm() / cov.norm() for m in (low, low_s))
    assert err_s < 1.1 * err + 1e-3


def test_parquet_behind_a_uri_reads_lazily_in_the_same_order_and_names_bad_rows(digits, shards, tmp_path):
    cfg = load_config("digits", overrides=["data.dataset=parquet", f"data.path=file://{shards}"])
    pq_ds = build_dataset(cfg)
    assert len(pq_ds) == len(digits) and len(pq_ds.shards) == 4
    assert not pq_ds.cache  # nothing read yet beyond the footers
    quantised = lambda x: unit_to_uint8(x).float() / 127.5 - 1  # noqa: E731 — what PNG bytes hold
    for i in (0, 499, 500, 1796):
        x, y = pq_ds[i]
        assert torch.equal(x, quantised(digits[i][0])) and y == int(digits[i][1])
    a, b = random_items(digits, 70, seed=4), random_items(pq_ds, 70, seed=4)
    assert torch.equal(quantised(a[0]), b[0]) and torch.equal(a[1], b[1])
    streamed = torch.cat([x for x, _ in iter_batches(pq_ds, 333)])
    assert torch.equal(streamed, torch.stack([quantised(digits[i][0]) for i in range(len(digits))]))

    bad = tmp_path / "bad"
    bad.mkdir()
    rows = [digits_png(digits, i) for i in range(10)]
    rows[7] = rows[7][:40]  # truncated PNG
    pq.write_table(pa.table({"image": pa.array(rows, type=pa.binary())}), bad / "part-0.parquet")
    bad_ds = build_dataset(load_config("digits", overrides=["data.dataset=parquet", f"data.path={bad}"]))
    assert bad_ds[6][1] == -1  # no label column: unlabelled
    with pytest.raises(DatasetError, match=r"part-0\.parquet' row 7"):
        list(iter_batches(bad_ds, 4))
    (bad / "part-1.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"part-1\.parquet' cannot be read"):
        build_dataset(load_config("digits", overrides=["data.dataset=parquet", f"data.path={bad}"]))
    # a shard cut short after its footer was read: named on random access and when streamed
    (bad / "part-1.parquet").unlink()
    truncated = build_dataset(load_config("digits", overrides=["data.dataset=parquet", f"data.path={bad}"]))
    data = (bad / "part-0.parquet").read_bytes()
    (bad / "part-0.parquet").write_bytes(data[:20] + data[-(len(data) // 3) :])
    with pytest.raises(DatasetError, match=r"part-0\.parquet' cannot be read"):
        truncated[0]
    with pytest.raises(DatasetError, match=r"part-0\.parquet' cannot be read"):
        list(iter_batches(truncated, 4))


def digits_png(digits, i: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(unit_to_uint8(digits[i][0])[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_behind_a_uri_labels_by_first_level_folder_and_names_a_bad_file(digits, tmp_path):
    for i in range(6):
        folder = tmp_path / "imgs" / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(digits_png(digits, i))
    (tmp_path / "imgs" / "loose.png").write_bytes(digits_png(digits, 0))
    cfg = load_config("digits", overrides=["data.dataset=image_folder", f"data.path=file://{tmp_path / 'imgs'}"])
    ds = build_dataset(cfg)
    assert len(ds) == 7 and ds.classes == ["class_0", "class_1"]
    assert sorted(ds.labels) == [-1, 0, 0, 0, 1, 1, 1]
    (tmp_path / "imgs" / "class_1" / "5.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"class_1/5\.png"):
        list(iter_batches(build_dataset(cfg), 3))


def test_fid_against_streamed_reference_statistics_equals_fid_against_all_features(tmp_path):
    from cleanfid.fid import fid_from_feats

    from hdebm_ray.evaluation.fid import frechet_to_reference

    cfg = load_config("digits", overrides=["eval.features=raw", f"data.path={tmp_path}", "eval.batch_size=100"])
    space = FeatureSpace(cfg)
    ref = space.reference()
    feats = torch.stack([x for x, _ in build_dataset(cfg)]).flatten(1).double().numpy()
    assert ref.n == len(feats) and ref.kid_features.shape == (1797, 256)  # fewer than kid_reference_samples
    assert np.abs(ref.sigma - np.cov(feats, rowvar=False)).max() <= 1e-8 * np.abs(ref.sigma).max()
    samples = feats[:300] + 0.05
    assert frechet_to_reference(samples, ref) == pytest.approx(fid_from_feats(samples, feats), rel=1e-6)
    # cached with what produced it, and read back instead of recomputed
    (path,) = (tmp_path / "fid_cache").glob("ref-*.npz")
    again = FeatureSpace(cfg).reference()
    assert again.produced_by["images"] == 1797 and again.produced_by["features"] == "raw"
    assert np.array_equal(again.mu, ref.mu) and path.stat().st_size < 2 * 1797 * 256 * 8
    small = FeatureSpace(cfg.replace(**{"eval.kid_reference_samples": 100})).reference()
    assert small.kid_features.shape == (100, 256) and np.allclose(small.mu, ref.mu, atol=1e-12)


def test_convert_refuses_a_folder_with_shards_and_overwrite_replaces_them(digits, tmp_path):
    out = tmp_path / "out"
    first = write_parquet_shards(digits, f"file://{out}", shard_size=400)
    # shuffled by default: every shard holds every class, though the source lists them in runs
    table = pq.read_table(first[0].removeprefix("file://"))
    assert len(set(table.column("label").to_pylist())) == 10
    assert sorted(pq.read_table(out).column("index").to_pylist()) == list(range(1797))
    assert [p.rsplit("/", 1)[1] for p in first] == [f"shard-0000{i}.parquet" for i in range(5)]
    assert not list(out.glob("*.tmp"))
    with pytest.raises(OutputExists, match="--overwrite"):
        write_parquet_shards(digits, str(out), shard_size=1000)
    assert len(list(out.glob("*.parquet"))) == 5  # untouched
    cfg = load_config("digits", overrides=["data.dataset=parquet", f"data.path={out}", "eval.features=raw"])
    before = build_dataset(cfg).fingerprint
    FeatureSpace(cfg).reference()
    write_parquet_shards(digits, str(out), shard_size=1000, overwrite=True, shuffle=False)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    # the caches derived from the data are keyed on its files: new shards, a new reference, not the stale one
    assert build_dataset(cfg).fingerprint != before
    FeatureSpace(cfg).reference()
    assert len(list((out / "fid_cache").glob("ref-*.npz"))) == 2
    table = pq.read_table(out / "shard-00001.parquet")
    assert table.column("index").to_pylist() == list(range(1000, 1797))

    # the CLI: one line naming the flag, exit 2, no traceback; nothing written
    cmd = [sys.executable, "-m", "hdebm_ray", "dataset", "convert", "--source", "digits", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert len(list(out.glob("*.parquet"))) == 2
    # --overwrite into the folder it reads from would delete the source before reading it: refused
    cmd = [sys.executable, "-m", "hdebm_ray", "dataset", "convert", "--source", "parquet", "--in", str(out)]
    r = subprocess.run(cmd + ["--out", str(out), "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 2 and "overlap" in r.stderr and "Traceback" not in r.stderr
    assert len(list(out.glob("*.parquet"))) == 2


def test_ray_data_decode_names_bad_rows_and_failures_surface_as_one_line(digits):
    # The Ray Data side without Ray: the map_batches function, and how a run's failure is unwrapped.
    from hdebm_ray.config import Config
    from hdebm_ray.distributed.ray_data import DecodeBatch, data_error_in, stream_seed

    decode = DecodeBatch(16, 1)
    good = [digits_png(digits, i) for i in range(3)]
    paths = np.array(["/d/part-0.parquet"] * 3)
    out = decode({"image": np.array(good, dtype=object), "label": np.array([1, 2, 3]), "path": paths})
    assert out["image"].dtype == np.uint8 and out["image"].shape == (3, 1, 16, 16)
    assert out["label"].tolist() == [1, 2, 3]
    with pytest.raises(DatasetError, match=r"part-0\.parquet' row with index 11 has a null"):
        decode(
            {
                "image": np.array(good, dtype=object),
                "label": np.array([1.0, np.nan, 3.0]),
                "path": paths,
                "index": np.array([10, 11, 12]),
            }
        )
    with pytest.raises(DatasetError, match=r"cannot decode the image in image file '/d/c/x\.png'"):
        DecodeBatch(16, 1, "/d", ("c",))(
            {"bytes": np.array([b"not a png"], dtype=object), "path": np.array(["/d/c/x.png"])}
        )
    assert DecodeBatch(16, 1, "/d", ("a", "c")).label_of("/d/c/x.png") == 1

    class WorkerGroupError(RuntimeError):  # as Ray Train raises it: the workers' errors by rank
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    try:
        try:
            raise DatasetError("cannot decode the image in image file '/d/c/x.png': truncated")
        except DatasetError as e:
            raise RuntimeError("ray task failed") from e
    except RuntimeError as wrapped:
        nested = WorkerGroupError({0: wrapped})
    assert data_error_in(nested) == "cannot decode the image in image file '/d/c/x.png': truncated"
    as_text = RuntimeError("...\nhdebm_ray.data_files.DatasetError: parquet shard 's' row 3 has a null label\n")
    assert data_error_in(as_text) == "parquet shard 's' row 3 has a null label"
    assert data_error_in(RuntimeError("something else")) is None
    assert stream_seed(Config(), "train") != stream_seed(Config(), "labelled")


def test_on_bad_image_skip_names_the_file_counts_it_and_keeps_batches_full(digits, tmp_path, capfd):
    from hdebm_ray.distributed.ray_data import DecodeBatch, WorkerStreams
    from hdebm_ray.training.runner import run_in_process

    # Ray Data's decode marks the bad row (a line names the file); the worker drops it and tops the batch up.
    good = [digits_png(digits, i) for i in range(3)]
    batch = {"bytes": np.array([good[0], b"broken", good[1]], dtype=object), "path": np.array(["/d/a", "/d/b", "/d/c"])}
    out = DecodeBatch(16, 1, "/d", (), on_bad_image="skip")(batch)
    assert out["bad"].tolist() == [0, 1, 0] and (out["image"][1] == 0).all()
    assert (
        "skipping an image (data.on_bad_image: skip): cannot decode the image in image file '/d/b'"
        in capfd.readouterr().out
    )
    streams = WorkerStreams(load_config("digits", overrides=["data.on_bad_image=skip"]), torch.device("cpu"))
    streams.skipped["train"] = 0
    marks = [[0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]  # 3 of 12 rows bad
    incoming = [
        {"image": torch.arange(4 * b, 4 * b + 4), "label": torch.arange(4), "bad": torch.tensor(m)}
        for b, m in enumerate(marks)
    ]
    got = [x.tolist() for x, _ in streams._without_bad("train", iter(incoming), 4)]
    assert got == [[0, 2, 3, 6], [7, 8, 9, 10]] and streams.skipped["train"] == 3  # full batches, order kept
    assert streams.metrics()["Data/skipped_images"] == 3

    # The in-process path over an image folder: training reads past the broken file, naming it once.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(16):
        (folder / f"{i:02d}.png").write_bytes(digits_png(digits, i))
    (folder / "05.png").write_bytes(b"\x89PNG broken")
    overrides = [f"run.storage_path={tmp_path}", "data.dataset=image_folder", f"data.path={folder}"]
    overrides += ["diffusion.steps=3", "diffusion.batch_size=16", "diffusion.report_every=3"]
    overrides += [
        "diffusion.checkpoint_every=3",
        "network.unet.channels=16",
        "network.unet.channel_mult=[1]",
        "network.unet.attn_resolutions=[]",
    ]
    with pytest.raises(DatasetError, match=r"05\.png"):
        run_in_process(load_config("digits", overrides=overrides), "diffusion", tmp_path / "fail")
    capfd.readouterr()
    metrics, _ = run_in_process(
        load_config("digits", overrides=[*overrides, "data.on_bad_image=skip"]), "diffusion", tmp_path / "skip"
    )
    printed = capfd.readouterr().out
    assert printed.count("05.png") == 1 and "(1 so far, data.on_bad_image: skip)" in printed
    ds = build_dataset(load_config("digits", overrides=[*overrides, "data.on_bad_image=skip"]))
    assert len(torch.cat([x for x, _ in iter_batches(ds, 4)])) == 15 and ds.skipped == {5}
