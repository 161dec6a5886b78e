"""Who a run belongs to: its identity (a run id written once, when the run is created) and the lease that makes one
driver its owner at a time.

- ``run.json`` in the run's folder holds the run id. Everything a run creates outside its folder is named from it
  (the bank actors, the eval pool), so two runs never share one, whatever their ``run.name``; an actor a driver finds
  by name proves it belongs to this run (``owner_check``) before it is used.
- ``owner.json`` is the lease: the driver that holds it (host, pid, Ray job id, when it started), renewed by a
  heartbeat thread every ``run.lease_s`` / 3 seconds. A second driver on the same run is refused in one line naming
  the holder while the lease is fresh; a dead driver's lease expires after ``run.lease_s`` (or at once when the
  holder was on this host and its process is gone), and its successor takes the run over. A driver whose lease was
  taken over stops at its next heartbeat (``LeaseLost``) rather than write beside the new owner.

Writes go through ``storage``: local paths and shared mounts use an exclusive create / a rename; object stores have
no compare-and-swap, so a claim there is written and read back after a short settle (the last writer wins, and the
loser sees it and stops).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from . import storage
from .storage import RunStateError, read_json

RUN_FILE = "run.json"  # the run's identity: written once, never changed
OWNER_FILE = "owner.json"  # the lease of the driver that owns the run now
SETTLE_S = 0.5  # object stores: how long a claim is left before it is read back


class RunInUse(RuntimeError):
    """Another live driver owns the run: the message names it, in one line."""


class LeaseLost(RuntimeError):
    """This driver's lease on its run was taken over (it was presumed dead): it must stop writing."""


def run_id(run_location: str, create: bool = True) -> str | None:
    """The run's id from ``<run>/run.json``, created with a fresh one if the run has none yet (None instead when
    not ``create``: a dry run's check)."""
    path = f"{run_location}/{RUN_FILE}"
    if not storage.exists(path):
        if not create:
            return None
        identity = {"run_id": uuid.uuid4().hex[:16], "created_at": time.time(), "location": run_location}
        storage.create_exclusive(path, json.dumps(identity, indent=2))  # two creators: one id wins, both read it
    fix = "it names this run's actors; restore it from a backup, or delete it to give the run a new identity"
    ident = read_json(path, "the run identity file", fix)
    if not isinstance(ident.get("run_id"), str) or not ident["run_id"]:
        raise RunStateError(f"the run identity file '{path}' has no run_id: {fix}")
    return ident["run_id"]


class StorageNotShared(RuntimeError):
    """A process on another node cannot see the run's folder: ``run.storage_path`` is node-local."""


def check_run_visible(run_location: str, identity: str) -> None:
    """``StorageNotShared`` where this process (a worker, possibly on a node an autoscaler added after the driver's
    checks) does not see the run the driver created at ``run_location`` (``identity``: ``run_identity``'s)."""
    path = f"{run_location}/{RUN_FILE}"
    seen = None
    if storage.exists(path):
        try:
            seen = f"{read_json(path, 'the run identity file', '').get('run_id')}@{run_location}"
        except RunStateError:
            seen = None
    if seen != identity:
        raise StorageNotShared(
            f"run.storage_path: a worker on node {socket.gethostname()} does not see this run's {RUN_FILE} at "
            f"'{path}' (the driver created it): the path is node-local. Use an s3:// or gs:// URI or a folder every "
            "node mounts (NFS, Lustre, fuse)"
        )


def run_identity(run_location: str) -> str:
    """The run's identity as actors carry it: its id at its location (a copied run folder keeps the id but not the
    location, so its actors are told apart)."""
    return f"{run_id(run_location)}@{run_location}"


@dataclass(frozen=True)
class Holder:
    """A driver that owns (or owned) a run."""

    token: str  # this lease's own id
    host: str
    pid: int
    job_id: str  # the Ray job's id when submitted with `ray job submit`, '' otherwise
    started_at: float
    heartbeat_at: float

    def describe(self, now: float) -> str:
        job = f", Ray job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on {self.host}{job}, started {hms_ago(now - self.started_at)} ago"

    def alive(self, now: float, lease_s: float) -> bool:
        """Whether the holder may still be running: its heartbeat is fresh and, on this host, its process lives."""
        if now - self.heartbeat_at > lease_s:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's live process
                return True
        return True


def hms_ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _job_id() -> str:
    return os.environ.get("RAY_JOB_SUBMISSION_ID", "") or os.environ.get("RAY_JOB_ID", "")


class RunLease:
    """The lease on a run folder: ``acquire`` (``RunInUse`` if a live driver holds it), a heartbeat thread while held,
    ``release`` at the end. ``lost`` is set if another driver took the lease over."""

    def __init__(self, run_location: str, lease_s: float, what: str = "run", exit_on_loss: bool = False):
        self.location, self.lease_s, self.what, self.exit_on_loss = run_location, lease_s, what, exit_on_loss
        self.path = f"{run_location}/{OWNER_FILE}"
        self.holder: Holder | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> Holder | None:
        if not storage.exists(self.path):
            return None
        fix = "delete it if no driver runs this run (it only records who owns it)"
        data = read_json(self.path, f"the {self.what}'s owner file", fix)
        try:
            return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
        except (KeyError, TypeError):
            raise RunStateError(f"the {self.what}'s owner file '{self.path}' is not an owner record: {fix}") from None

    def refuse_if_held(self) -> Holder | None:
        """``RunInUse`` if a live driver holds the lease (nothing written: a dry run's check); else the dead holder,
        if any."""
        now = time.time()
        held = self.current()
        if held is not None and held.alive(now, self.lease_s):
            raise RunInUse(
                f"{self.what} {self.location} is in use by another driver ({held.describe(now)}, last heartbeat "
                f"{now - held.heartbeat_at:.0f} s ago); wait for it or stop it, or use another run.name"
            )
        return held

    def acquire(self) -> RunLease:
        now = time.time()
        held = self.refuse_if_held()
        me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _job_id(), now, now)
        text = json.dumps(asdict(me), indent=2)
        if held is None:
            storage.create_exclusive(self.path, text)
        else:  # a dead holder's lease: taken over
            storage.write_text(self.path, text)
        if storage.is_uri(self.path):
            time.sleep(SETTLE_S)
        now_held = self.current()
        if now_held is None or now_held.token != me.token:  # another driver claimed it at the same moment
            raise RunInUse(
                f"{self.what} {self.location} was claimed at the same moment by another driver "
                f"({now_held.describe(time.time()) if now_held else 'unknown'}); use another run.name"
            )
        self.holder = me
        if held is not None:
            print(f"[run] took over {self.what} {self.location} from a driver that is gone ({held.describe(now)})")
        self._thread = threading.Thread(target=self._beat, name="hdebm-run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                held = self.current()
            except (OSError, RunStateError):
                continue  # a storage hiccup: try again at the next beat, the lease has slack
            if held is None or held.token != self.holder.token:
                self.lost.set()
                if self.exit_on_loss:  # whatever this process still runs must not write beside the new owner
                    print(f"[run] another driver took {self.what} {self.location} over: this driver stops", flush=True)
                    os._exit(75)
                return
            self.holder = Holder(**{**asdict(self.holder), "heartbeat_at": time.time()})
            try:
                storage.write_text(self.path, json.dumps(asdict(self.holder), indent=2))
            except OSError:
                continue

    def check(self) -> None:
        """``LeaseLost`` if another driver took the run over."""
        if self.lost.is_set():
            raise LeaseLost(f"another driver took {self.what} {self.location} over; this driver stops")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self.current()
            if held is not None and self.holder is not None and held.token == self.holder.token:
                storage.remove_file(self.path)
        except (OSError, RunStateError):
            pass

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _private_group(gid: int) -> bool:
    """A user private group (the default on Debian / Ubuntu, with umask 002): this user's primary group, with no
    other member. Its write bit lets nobody else in."""
    import grp
    import pwd

    try:
        me = pwd.getpwuid(os.getuid()).pw_name
        return gid == os.getgid() and set(grp.getgrgid(gid).gr_mem) <= {me}
    except KeyError:
        return False


def check_private(location: str, what: str) -> None:
    """``RunStateError`` where a local folder we are about to load pickles from (a Tune sweep's saved state, which
    ``--resume`` unpickles in the driver) could have been written by another user: the folder or anything in it
    (symbolic links followed) owned by someone else, or writable by others or by a group shared with others.
    Whoever can write there could run code as this user. An object store's prefix has no such bits to read: its
    bucket policy is the boundary (docs/usage.md)."""
    if storage.is_object_store(location):
        return
    folder = location.removeprefix("file://")
    if not os.path.isdir(folder):
        return
    me = os.getuid()
    for parent, dirs, files in os.walk(folder):
        for path in [parent] + [os.path.join(parent, name) for name in dirs + files]:
            link = os.lstat(path)
            try:
                target = os.stat(path)  # a link's own mode bits mean nothing: its target's count
            except OSError:  # a dangling link: nothing to load through it
                target = link
            if link.st_uid != me or target.st_uid != me:
                problem = "belongs to another user"
            elif target.st_mode & 0o002 or (target.st_mode & 0o020 and not _private_group(target.st_gid)):
                problem = "is writable by other users"
            else:
                continue
            raise RunStateError(
                f"{what}: '{path}' {problem}, and {what.split()[0]} loads pickled state from this folder (loading it "
                "would run whatever code was written there): make the folder yours alone (chmod -R go-w) or start "
                "a new one"
            )
