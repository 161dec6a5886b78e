"""Where runs live: a local directory, a shared mount (NFS, Lustre, fuse), or an object store (s3://, gs://).

Ray Train writes checkpoints through pyarrow filesystems; everything else this package writes next to them
(bank snapshots, TensorBoard events, sample grids, ``pipeline.json``) goes through the same pyarrow
filesystem here, so a run under ``s3://bucket/runs`` is as complete as one under ``./runs``. ``file://`` URIs
take the object-store code path on a local disk, which is how the tests exercise it.

On a multi-node cluster every node must see the run directory: a checkpoint written by a worker on node A is
restored by a worker that may land on node B. ``check_shared_storage`` refuses a node-local path there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from ..config import Config, ConfigError

# Filesystem types (from /proc/mounts) that every node of a cluster can mount.
NETWORK_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p", "efs")


def is_uri(path: str) -> bool:
    return "://" in str(path)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str, key: str = "run.name") -> None:
    """A run (or sweep) name names one folder under run.storage_path: no separators, no '..'. Checked where
    runs are created (the CLI), not on every config load, so old checkpoints stay readable."""
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"{key} = {name!r} must be one folder name: letters, digits, '.', '_', '-' (at most 128, starting "
            f"with a letter or digit)"
        )


def run_dir(cfg: Config) -> str:
    """Absolute storage location of this run (local path, shared mount or URI)."""
    base = cfg.run.storage_path
    if not is_uri(base):
        base = str(Path(base).expanduser().resolve())
    return f"{base.rstrip('/')}/{cfg.run.name}"


def fs_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(location)


def as_uri(fs_path: str, like: str) -> str:
    """Turn a path Ray returns for a URI storage (scheme stripped: ``bucket/key``) back into a URI."""
    if not is_uri(like) or is_uri(fs_path):
        return fs_path
    scheme = like.split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def exists(location: str) -> bool:
    fs, path = fs_and_path(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    fs, path = fs_and_path(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def is_object_store(location: str) -> bool:
    """Whether ``location`` is in an object store (s3://, gs://, ...), where a "move" is a server-side copy (S3:
    5 GiB at most, and as slow as the copy) but an object appears whole or not at all."""
    return is_uri(location) and not location.startswith("file://")


def temporary_name(path: str) -> str:
    """A hidden sibling name no other writer uses (two drivers, two ranks, two attempts each get their own)."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextlib.contextmanager
def atomic_output(location: str):
    """An output stream whose contents appear at ``location`` whole or not at all: on a filesystem (local, a shared
    mount, file://) written under a temporary name and renamed when the block ends; in an object store written to
    the key itself (an upload becomes visible only when it completes), never copied server-side."""
    fs, path = fs_and_path(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if is_object_store(location):
        try:
            with fs.open_output_stream(path) as out:
                yield out
        except BaseException:  # closing completed the upload: what it holds is partial, so it must not stay
            with contextlib.suppress(OSError):
                fs.delete_file(path)
            raise
        return
    tmp = temporary_name(path)
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


class RunStateError(RuntimeError):
    """A run-state file that cannot be read (``pipeline.json``, ``guard.json``, ``divergence.json``, ``run.json``,
    ``owner.json``): the message names it and says what to do."""


def read_json(location: str, what: str, fix: str) -> dict:
    """A run-state JSON object; ``RunStateError`` naming the file, ``what`` it is and ``fix`` when it is unreadable
    (truncated by a crash, edited by hand)."""
    try:
        data = json.loads(read_text(location))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as e:
        raise RunStateError(f"{what} '{location}' cannot be read ({str(e).splitlines()[0]}): {fix}") from None


def write_text(location: str, text: str) -> None:
    """Write so that a reader never sees half a file (``atomic_output``)."""
    with atomic_output(location) as out:
        out.write(text.encode())


def create_exclusive(location: str, text: str) -> bool:
    """Create a file only if nothing is there yet; True if this call created it. On a filesystem the create is
    exclusive (one of two racing callers wins); an object store has no such create, so there the check and the
    write are two requests (callers read back what they wrote)."""
    if not is_uri(location) or location.startswith("file://"):
        path = location.removeprefix("file://")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        Path(tmp).write_text(text)
        try:  # a hard link appears whole and fails if the name exists: a reader never sees it half written
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a mount without hard links (some FUSE): an exclusive create, then the write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
        finally:
            os.unlink(tmp)
        return True
    if exists(location):
        return False
    write_text(location, text)
    return True


def remove_file(location: str) -> None:
    """Delete a file (local path or URI); nothing if it is not there."""
    fs, path = fs_and_path(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def upload(local_path: str | Path, location: str) -> str:
    """Copy a local file or directory to ``location`` (a no-op when it is the same local path)."""
    local_path = Path(local_path)
    if not is_uri(location) and Path(location).resolve() == local_path.resolve():
        return location
    fs, path = fs_and_path(location)
    fs.create_dir(path if local_path.is_dir() else path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local_path), path, destination_filesystem=fs)
    return location


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy one file between any two locations (local paths or URIs), making the target's folder."""
    sfs, spath = fs_and_path(str(source))
    tfs, tpath = fs_and_path(str(target))
    tfs.create_dir(tpath.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(spath, tpath, source_filesystem=sfs, destination_filesystem=tfs)


def remove_tree(location: str) -> None:
    """Delete a folder (local path or URI) with everything in it; nothing if it is not there."""
    fs, path = fs_and_path(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_dirs(location: str) -> list[tuple[str, int]]:
    """(location, modification time in ns) of the folders directly inside ``location`` (0 where an object store
    keeps no folder times); empty if it is not there."""
    fs, path = fs_and_path(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]
    return [(f"{location.rstrip('/')}/{i.base_name}", i.mtime_ns or 0) for i in infos]


@contextlib.contextmanager
def local_dir(location: str):
    """A local directory with the contents of ``location``: itself when local, else a temporary download."""
    if not is_uri(location):
        yield Path(location)
        return
    tmp = tempfile.mkdtemp(prefix="hdebm-")
    try:
        fs, path = fs_and_path(location)
        pafs.copy_files(path, tmp, source_filesystem=fs)
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output(location: str):
    """A local directory to write into; its contents are uploaded to ``location`` when the block ends."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    tmp = tempfile.mkdtemp(prefix="hdebm-out-")
    try:
        yield Path(tmp)
        upload(tmp, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mount_fs_type(path: str | Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding ``path`` (longest matching mount point), or None if unknown."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def is_shared_location(location: str, mounts_file: str = "/proc/mounts") -> bool:
    if is_uri(location):
        return not location.startswith("file://")
    fs_type = mount_fs_type(location, mounts_file) or ""
    return fs_type.startswith("fuse") or fs_type in NETWORK_FS_TYPES


def check_shared_storage(cfg: Config, num_nodes: int, mounts_file: str = "/proc/mounts") -> None:
    """Refuse a node-local run directory on a multi-node cluster, before any work starts."""
    if num_nodes <= 1 or cfg.run.shared_storage:
        return
    location = run_dir(cfg)
    if not is_shared_location(location, mounts_file):
        raise ConfigError(
            f"run.storage_path = {cfg.run.storage_path!r} is node-local ({location}), but the cluster has "
            f"{num_nodes} nodes: a worker restarted on another node could not find the checkpoints. Use an "
            "s3:// or gs:// URI or a shared mount (NFS, Lustre, fuse), or set run.shared_storage=true if this "
            "path is mounted on every node."
        )


def check_not_in_job_working_dir(cfg: Config) -> None:
    """A submitted job runs in a temporary copy of its working_dir: a relative run directory would vanish."""
    path = cfg.run.storage_path
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not is_uri(path) and not Path(path).expanduser().is_absolute():
        raise ConfigError(
            f"run.storage_path = {path!r} is relative, but this is a submitted Ray job: its working directory is a "
            "temporary copy that is deleted with the job. Pass an absolute path on shared storage or a URI, "
            "e.g. --set run.storage_path=/mnt/cluster_storage/hdebm (jobs/submit.sh does this from $HDEBM_STORAGE)."
        )
