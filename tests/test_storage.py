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
