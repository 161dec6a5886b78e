"""Run-directory storage: URIs through pyarrow filesystems, and node-local paths refused on multi-node clusters."""

from __future__ import annotations

import pytest

from hdebm_ray.config import ConfigError, load_config
from hdebm_ray.io import storage
from hdebm_ray.io.checkpoint import load_meta, save_checkpoint

MOUNTS = """\
/dev/root / ext4 rw 0 0
tmpfs /tmp tmpfs rw 0 0
nas:/export/runs /mnt/nfs nfs4 rw 0 0
gcsfuse /mnt/gcs fuse.gcsfuse rw 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


def cfg_at(path, *extra):
    return load_config("digits", overrides=[f"run.storage_path={path}", *extra])


def test_mount_type_is_the_longest_matching_mount_point(mounts):
    assert storage.mount_fs_type("/mnt/nfs/a/b", mounts) == "nfs4"
    assert storage.mount_fs_type("/mnt/nfsx", mounts) == "ext4"  # a prefix of the name is not a parent
    assert storage.mount_fs_type("/mnt/gcs", mounts) == "fuse.gcsfuse"
    assert storage.mount_fs_type("/tmp/x", mounts) == "tmpfs"


@pytest.mark.parametrize("path", ["/mnt/nfs/runs", "/mnt/gcs/runs", "s3://bucket/runs", "gs://bucket/runs"])
def test_shared_locations_pass_on_a_multi_node_cluster(path, mounts):
    storage.check_shared_storage(cfg_at(path), num_nodes=4, mounts_file=mounts)


@pytest.mark.parametrize("path", ["/tmp/runs", "/home/me/runs", "file:///tmp/runs"])
def test_node_local_paths_are_refused_on_a_multi_node_cluster_naming_the_key(path, mounts):
    with pytest.raises(ConfigError, match="run.storage_path") as err:
        storage.check_shared_storage(cfg_at(path), num_nodes=2, mounts_file=mounts)
    assert "2 nodes" in str(err.value)
    storage.check_shared_storage(cfg_at(path), num_nodes=1, mounts_file=mounts)  # one node: fine
    storage.check_shared_storage(cfg_at(path, "run.shared_storage=true"), num_nodes=2, mounts_file=mounts)


def test_relative_storage_inside_a_submitted_job_is_refused(monkeypatch):
    storage.check_not_in_job_working_dir(cfg_at("runs"))  # a plain CLI run: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match="run.storage_path = 'runs' is relative"):
        storage.check_not_in_job_working_dir(cfg_at("runs"))
    storage.check_not_in_job_working_dir(cfg_at("/abs/runs"))
    storage.check_not_in_job_working_dir(cfg_at("s3://b/runs"))


def test_uri_round_trips_text_directories_and_checkpoint_meta(tmp_path):
    uri = f"file://{tmp_path}/store"
    storage.write_text(f"{uri}/a/pipeline.json", '{"x": 1}')
    assert storage.exists(f"{uri}/a/pipeline.json") and not storage.exists(f"{uri}/a/nothing")
    assert storage.read_text(f"{uri}/a/pipeline.json") == '{"x": 1}'
    assert not list((tmp_path / "store" / "a").glob("*.tmp"))

    local = tmp_path / "ckpt"
    save_checkpoint(local, {"w": {}}, cfg_at("runs"), {"step": 7})
    storage.upload(local, f"{uri}/ckpt")
    assert load_meta(f"{uri}/ckpt")["step"] == 7
    with storage.local_dir(f"{uri}/ckpt") as d:
        assert (d / "w.pt").is_file() and d != local
    with storage.staged_output(f"{uri}/out") as d:
        (d / "grid.png").write_bytes(b"png")
    assert (tmp_path / "store" / "out" / "grid.png").read_bytes() == b"png"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_meta(f"{uri}/a")


def test_ray_checkpoint_paths_are_turned_back_into_uris():
    assert storage.as_uri("bucket/run/ckpt", "s3://bucket/run") == "s3://bucket/run/ckpt"
    assert storage.as_uri("/tmp/run/ckpt", "file:///tmp/run") == "file:///tmp/run/ckpt"
    assert storage.as_uri("/tmp/run/ckpt", "/tmp/run") == "/tmp/run/ckpt"


class NoServerSideCopy:
    """An object store as S3 behaves for big objects: every file operation works, but a move (a server-side copy
    there, limited to 5 GiB) is refused; the files themselves live under a local root."""

    def __init__(self, root):
        import fsspec
        import pyarrow.fs as pafs

        class Handler(pafs.FSSpecHandler):
            def move(self, src, dest):
                raise OSError(f"server-side copy of {src} refused (object store)")

        self.fs, self.root = pafs.PyFileSystem(Handler(fsspec.filesystem("file"))), str(root)

    def __call__(self, location: str):
        return self.fs, self.root + location.split("://", 1)[1]


def test_storage_at_paper_scale_snapshots_without_a_copy_restores_in_place_and_uploads_bounded(tmp_path, monkeypatch):
    """A bank snapshot goes to an object store without a server-side copy and restores in about its own size; a run's
    state files do too; TensorBoard under a URI uploads only what changed, rolls its event files and leaves no
    temporary folder; PBT prunes chunk folders by the step in their names (object stores report no times)."""
    import json
    import subprocess
    import sys

    import numpy as np

    from hdebm_ray.bank.store import SlotStore

    store = SlotStore(512, {"x": (3, 16, 16), "z": (8,)})
    store.write(np.arange(512), 5, x=np.random.rand(512, 3, 16, 16).astype(np.float32), z=np.ones((512, 8), "f4"))
    monkeypatch.setattr(storage, "fs_and_path", NoServerSideCopy(tmp_path / "bucket"))
    monkeypatch.setattr("hdebm_ray.bank.store.fs_and_path", storage.fs_and_path)
    monkeypatch.setattr("hdebm_ray.bank.store.BATCH_BYTES", 100_000)  # several record batches
    path = store.snapshot("s3x://runs/r/stage1/bank", 5)
    loaded, step = SlotStore.load(path)
    assert step == 5 and np.array_equal(loaded.arrays["x"], store.arrays["x"])
    assert np.array_equal(loaded.written_step, store.written_step)
    storage.write_text("s3x://runs/r/pipeline.json", "{}")
    assert storage.read_text("s3x://runs/r/pipeline.json") == "{}"
    assert not list((tmp_path / "bucket").rglob("*.tmp"))
    # a write that fails half way leaves nothing at the key (closing an object-store stream completes the upload)
    with pytest.raises(MemoryError), storage.atomic_output("s3x://runs/r/stage1/bank/half.arrow") as out:
        out.write(b"half a snapshot")
        raise MemoryError
    assert not storage.exists("s3x://runs/r/stage1/bank/half.arrow")
    monkeypatch.undo()

    # restoring a 480 MiB bank peaks within 1.2x its size (a fresh process; its peak RSS before and after)
    big = tmp_path / "big"
    script = (
        "import numpy as np; from hdebm_ray.bank.store import SlotStore\n"
        "s = SlotStore(10240, {'x': (3, 64, 64)}); s.write(np.arange(10240), 1, x=np.full((10240, 3, 64, 64), 0.5,"
        f" np.float32)); print(s.snapshot({str(big)!r}, 1))\n"
    )
    snapshot = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    probe = (
        "import re, json; from hdebm_ray.bank.store import SlotStore\n"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        f"before = hwm(); store, _ = SlotStore.load({snapshot.strip()!r}); after = hwm()\n"
        "print(json.dumps({'before': before, 'after': after, 'bytes': store.arrays['x'].nbytes}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert (out["after"] - out["before"]) <= 1.2 * out["bytes"], out

    # TensorBoard under a URI: each tick uploads only the grown event file, rolled past ROLL_BYTES
    from hdebm_ray.training.stage_log import StageLogger

    class Stage:
        name, images_per_step, total_steps, ctx = "s", 1, 1000, None

    uploads = []
    real_copy = storage.copy_file
    monkeypatch.setattr(
        "hdebm_ray.training.stage_log.copy_file", lambda a, b: (uploads.append(a.stat().st_size), real_copy(a, b))
    )
    monkeypatch.setattr(StageLogger, "ROLL_BYTES", 60_000)  # about 5 files (TensorBoard orders them by name)
    logger = StageLogger(Stage(), f"file://{tmp_path}/tb", enabled=True)
    local = logger.local
    for step in range(300):
        logger.log(step, {f"Loss/m{i}": float(step) for i in range(20)})
    logger.close()
    assert max(uploads) < 60_000 + 5_000 and len(list((tmp_path / "tb" / "s").glob("events.*"))) > 3
    assert not (local and __import__("os").path.exists(local))  # the local folder is gone
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "s"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Loss/m0")] == list(range(300))  # every tick, across the rolled files

    # PBT prunes by the step in the folder names: list_dirs reports no times on an object store
    from hdebm_ray.distributed.pbt import KEEP_OLDER, prune

    run = tmp_path / "trial"
    for step in (10, 20, 30, 40, 50):
        (run / f"stage1-to-{step:08d}-abcdef").mkdir(parents=True)
    monkeypatch.setattr(storage, "list_dirs", lambda loc: [(d, 0) for d, _ in real_list(loc)])
    cfg = load_config("digits", overrides=[f"run.storage_path={tmp_path}", "run.name=trial"])
    prune(cfg, "stage1", keep=str(run / "stage1-to-00000050-abcdef" / "checkpoint_00000050"))
    kept = sorted(p.name for p in run.iterdir())
    assert len(kept) == KEEP_OLDER + 1 and kept[0] == "stage1-to-00000020-abcdef"


real_list = storage.list_dirs
