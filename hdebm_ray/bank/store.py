"""The storage under the bank and the replay buffer, pure numpy: N slots of named arrays with per-slot write
statistics and lineages, Arrow IPC snapshots (local path or any pyarrow filesystem URI) tagged with the training
step, and the lease table that keeps concurrent workers on disjoint slots."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from ..io import storage
from ..io.storage import fs_and_path

SNAPSHOT_PREFIX = "bank_step_"
BATCH_BYTES = 16 * 2**20  # rows of a snapshot per record batch: at most this many bytes


def snapshot_name(step: int) -> str:
    return f"{SNAPSHOT_PREFIX}{step:010d}.arrow"


def snapshot_location(checkpoint: str, step: int) -> str:
    """Where the store snapshot of a checkpoint's ``step`` lies: ``bank/`` beside the checkpoint directory."""
    parent = str(checkpoint).rstrip("/").rsplit("/", 1)[0]
    return f"{parent}/bank/{snapshot_name(step)}"


class SlotStore:
    """N slots of named float32 fields (e.g. z1, z2, x) with, per slot, the step of the last write, the number of
    writes and a lineage id (which chain the slot's state descends from; -1 = none), plus named integer counters
    that travel with snapshots (a replay buffer's ring position and next lineage id).

    For the bank's audit (``count_writes``, called by ``bank.Bank``) it also counts, per training step, the slots
    written with that step (``step_writes``; step 0 is the initial fill) and the writes that hit a slot already
    written in the same step (``double_writes``); ``audit_from`` is the step before which the counts are not
    complete (a refill, a fallback to an older snapshot, a snapshot written before they existed). All three
    travel with snapshots."""

    def __init__(self, size: int, shapes: dict[str, tuple[int, ...]]):
        self.size, self.shapes = size, {k: tuple(v) for k, v in shapes.items()}
        self.arrays = {k: np.zeros((size, *shape), dtype=np.float32) for k, shape in self.shapes.items()}
        self.written_step = np.full(size, -1, dtype=np.int64)  # training step of the last write, -1 = never
        self.writes = np.zeros(size, dtype=np.int64)
        self.lineage = np.full(size, -1, dtype=np.int64)
        self.counters: dict[str, int] = {}
        self.step = 0  # latest training step seen in a write
        self._step_counts = np.zeros(1024, dtype=np.int64)  # grown by doubling: no copy per step
        self._steps_counted = 0
        self.double_writes = 0
        self.audit_from = 0

    @property
    def step_writes(self) -> np.ndarray:
        """[s]: the slots written with step s (counted by ``count_writes``)."""
        return self._step_counts[: self._steps_counted]

    def count_writes(self, idx: np.ndarray, step: int) -> None:
        """Count a write of slots ``idx`` at ``step``, before it happens (a slot already written at ``step``, or
        named twice, is a double write; step 0 is the fill)."""
        idx = np.asarray(idx, dtype=np.int64)
        if step > 0:
            self.double_writes += int((self.written_step[idx] == step).sum()) + len(idx) - len(np.unique(idx))
        if step >= len(self._step_counts):
            grown = np.zeros(max(2 * len(self._step_counts), step + 1), dtype=np.int64)
            grown[: self._steps_counted] = self.step_writes
            self._step_counts = grown
        self._step_counts[step] += len(idx)
        self._steps_counted = max(self._steps_counted, step + 1)

    def load_step_writes(self, counts: np.ndarray) -> None:
        self._step_counts = np.concatenate([counts, np.zeros(1024, dtype=np.int64)])
        self._steps_counted = len(counts)

    def write(self, idx: np.ndarray, step: int, lineage: np.ndarray | None = None, **fields: np.ndarray) -> None:
        missing = set(self.shapes) - set(fields)
        if missing:
            raise ValueError(f"write is missing fields {sorted(missing)}")
        for k, v in fields.items():
            self.arrays[k][idx] = v
        self.written_step[idx] = step
        self.writes[idx] += 1
        if lineage is not None:
            self.lineage[idx] = lineage
        self.step = max(self.step, step)

    def read(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: a[idx] for k, a in self.arrays.items()}

    def stats(self) -> dict[str, float]:
        filled = self.written_step >= 0
        age = (self.step - self.written_step[filled]).mean() if filled.any() else 0.0
        return {
            "filled_fraction": float(filled.mean()),
            "mean_slot_age_steps": float(age),
            "mean_writes_per_slot": float(self.writes.mean()),
        }

    # -- snapshots ------------------------------------------------------------------------------------------

    def snapshot(self, directory: str, step: int) -> str:
        """Write every slot to ``directory/bank_step_<step>.arrow``, whole or not at all (``storage.atomic_output``:
        renamed into place on a filesystem, written to its key in an object store, never copied server-side), in
        record batches of at most ``BATCH_BYTES``, so neither writing nor reading it back holds a second copy."""
        meta = {
            "step": str(step),
            "size": str(self.size),
            **{f"shape:{k}": ",".join(map(str, s)) for k, s in self.shapes.items()},
            **{f"counter:{k}": str(v) for k, v in self.counters.items()},
            "step_writes": encode_runs(self.step_writes),
            "double_writes": str(self.double_writes),
            "audit_from": str(self.audit_from),
        }
        row_bytes = sum(a[0].nbytes for a in self.arrays.values()) + 24
        rows = max(1, BATCH_BYTES // row_bytes)
        path = f"{directory.rstrip('/')}/{snapshot_name(step)}"
        with storage.atomic_output(path) as out:
            writer = None
            for start in range(0, self.size, rows):
                batch = self._batch(slice(start, start + rows))
                if writer is None:
                    writer = ipc.new_file(out, batch.schema.with_metadata(meta))
                writer.write_batch(batch)
            writer.close()
        return path

    def _batch(self, rows: slice) -> pa.RecordBatch:
        cols = {
            k: pa.FixedSizeListArray.from_arrays(pa.array(a[rows].reshape(-1)), int(np.prod(a.shape[1:])))
            for k, a in self.arrays.items()
        }
        cols["written_step"] = pa.array(self.written_step[rows])
        cols["writes"] = pa.array(self.writes[rows])
        cols["lineage"] = pa.array(self.lineage[rows])
        return pa.record_batch(cols)

    @classmethod
    def load(cls, path: str) -> tuple[SlotStore, int]:
        """The store saved at ``path`` and the step it was tagged with; ``SnapshotError`` if the file cannot be
        read (truncated, not Arrow, missing columns)."""
        try:
            return cls._load(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # pyarrow's errors included
            raise SnapshotError(f"bank snapshot '{path}' cannot be read ({type(e).__name__}: {e})") from None

    def check_matches(self, size: int, shapes: dict[str, tuple[int, ...]], step: int, path: str) -> None:
        """``SnapshotError`` unless this loaded store has the expected size, fields and step tag."""
        want = {k: tuple(v) for k, v in shapes.items()}
        if self.size != size or self.shapes != want:
            raise SnapshotError(
                f"bank snapshot '{path}' holds {self.size} slots of {self.shapes}, this run's bank "
                f"{size} of {want} (was stage1.bank_size / the buffer size changed?)"
            )
        if self.step != step:
            raise SnapshotError(f"bank snapshot '{path}' is tagged step {self.step}, its name says {step}")

    @classmethod
    def _load(cls, path: str) -> tuple[SlotStore, int]:
        """Read the snapshot one record batch at a time into the store's arrays: the peak is the store plus one
        batch (a snapshot written in one batch, before 0.2, is read whole)."""
        fs, p = fs_and_path(path)
        with fs.open_input_file(p) as f:
            reader = ipc.open_file(f)
            meta = {k.decode(): v.decode() for k, v in reader.schema.metadata.items()}
            shapes = {
                k[6:]: tuple(int(x) for x in v.split(",") if x) for k, v in meta.items() if k.startswith("shape:")
            }
            store = cls(int(meta["size"]), shapes)
            start = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                rows = slice(start, start + batch.num_rows)
                for k, shape in shapes.items():
                    flat = batch.column(k).flatten().to_numpy(zero_copy_only=False)
                    store.arrays[k][rows] = flat.reshape(batch.num_rows, *shape)
                store.written_step[rows] = batch.column("written_step").to_numpy()
                store.writes[rows] = batch.column("writes").to_numpy()
                if "lineage" in batch.schema.names:
                    store.lineage[rows] = batch.column("lineage").to_numpy()
                start += batch.num_rows
                del batch
            if start != store.size:
                raise ValueError(f"{start} rows for {store.size} slots")
        store.counters = {k[8:]: int(v) for k, v in meta.items() if k.startswith("counter:")}
        store.load_step_writes(decode_runs(meta.get("step_writes", "")))
        store.double_writes = int(meta.get("double_writes", 0))
        step = int(meta["step"])
        # A snapshot from before the counts were kept: they are complete only from its step on.
        store.audit_from = int(meta["audit_from"]) if "audit_from" in meta else step
        store.step = step
        return store, step


def encode_runs(counts: np.ndarray) -> str:
    """Run-length text of per-step counts ("48x1,32x500": 48 once, then 32 for 500 steps): a bank's counts are
    nearly all the global batch, so this stays a few bytes in the snapshot's metadata."""
    if not len(counts):
        return ""
    starts = np.flatnonzero(np.diff(counts, prepend=counts[0] - 1))
    lengths = np.diff(np.append(starts, len(counts)))
    return ",".join(f"{counts[s]}x{n}" for s, n in zip(starts, lengths, strict=True))


def decode_runs(text: str) -> np.ndarray:
    runs = np.array([[int(v) for v in run.split("x")] for run in text.split(",") if run], dtype=np.int64)
    return np.repeat(runs[:, 0], runs[:, 1]) if len(runs) else np.zeros(0, dtype=np.int64)


class SnapshotError(RuntimeError):
    """A bank snapshot that cannot be used: unreadable, or not this run's bank."""


def list_snapshots(directory: str) -> dict[int, str]:
    """{step: path} of the snapshots in ``directory`` (empty if it does not exist)."""
    fs, base = fs_and_path(directory)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(base))
    found = {}
    for info in infos:
        name = info.base_name
        if name.startswith(SNAPSHOT_PREFIX) and name.endswith(".arrow"):
            found[int(name[len(SNAPSHOT_PREFIX) : -6])] = info.path if "://" not in directory else f"{directory}/{name}"
    return found


def prune_snapshots(directory: str, keep_steps: set[int]) -> None:
    fs, _ = fs_and_path(directory)
    for step, path in list_snapshots(directory).items():
        if step not in keep_steps:
            fs.delete_file(fs_and_path(path)[1])


@dataclass
class Lease:
    lease_id: str
    owner: str
    idx: np.ndarray
    expires_at: float
    extra: dict | None = None  # what the store needs at commit time (a replay lease's re-init mask)


class LeaseTable:
    """Which slots are out, to whom, until when: every outstanding lease holds distinct slots.

    A lease whose owner died is reclaimed when it expires, or as soon as the same owner (a restarted rank) asks
    again; the commit of a reclaimed lease is refused, so a slot is never written by two committers."""

    def __init__(self, size: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.leases: dict[str, Lease] = {}
        self.leased = np.zeros(size, dtype=bool)
        # Lease ids are unique across tables: a commit retried from before an actor restart can never match a
        # lease the restarted actor granted to another rank.
        self.table_id = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self.reclaimed = 0
        self.rejected = 0

    def reclaim(self, owner: str) -> None:
        now = time.monotonic()
        for lease in list(self.leases.values()):
            if lease.owner == owner or lease.expires_at < now:
                self.release(lease)
                self.reclaimed += 1

    def free(self, candidates: np.ndarray) -> np.ndarray:
        return candidates[~self.leased[candidates]]

    def grant(self, owner: str, idx: np.ndarray, extra: dict | None = None) -> Lease:
        lease = Lease(f"{self.table_id}-{next(self._ids)}", owner, idx, time.monotonic() + self.timeout_s, extra)
        self.leases[lease.lease_id] = lease
        self.leased[idx] = True
        return lease

    def take(self, lease_id: str) -> Lease | None:
        """The lease, released; None (counted) if it was reclaimed or never existed."""
        lease = self.leases.get(lease_id)
        if lease is None:
            self.rejected += 1
            return None
        self.release(lease)
        return lease

    def release(self, lease: Lease) -> None:
        self.leased[lease.idx] = False
        del self.leases[lease.lease_id]

    def clear(self) -> None:
        self.leases.clear()
        self.leased[:] = False

    def stats(self) -> dict[str, float]:
        return {"leases_out": len(self.leases), "reclaimed_leases": self.reclaimed, "rejected_commits": self.rejected}


def draw_free(rng, table: LeaseTable, candidates: np.ndarray, n: int, what: str) -> np.ndarray:
    free = table.free(candidates)
    if len(free) < n:
        raise RuntimeError(f"{what} has {len(free)} free slots, {n} requested ({len(table.leases)} leases out)")
    return np.sort(rng.choice(free, size=n, replace=False))
