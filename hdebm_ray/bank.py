"""The shared sample store, pure numpy: HDEBM's latent/image bank and the baselines' replay buffer.

``SlotStore`` holds N entries of named fields as contiguous arrays plus per-slot statistics, and snapshots them
to an Arrow IPC file (local path or any pyarrow filesystem URI) tagged with the training step.

``Bank`` adds leases (ALGORITHMS §5, distributed reading): ``checkout(n, owner)`` hands out n slots that no other
outstanding lease holds; ``commit(lease, ...)`` overwrites exactly those slots and releases them. A lease whose
owner died is reclaimed when it expires, or as soon as the same owner (a restarted rank) checks out again.

``ReplayBuffer`` (M-EBM, Improved CD) samples chain starts, re-initialising each with probability ρ, and takes new
samples back. The Ray actor in ``bank_actor.py`` wraps either one.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from .storage import fs_and_path

SNAPSHOT_PREFIX = "bank_step_"


def snapshot_name(step: int) -> str:
    return f"{SNAPSHOT_PREFIX}{step:010d}.arrow"


class SlotStore:
    """N slots of named float32 fields (e.g. z1, z2, x) with write step and write count per slot."""

    def __init__(self, size: int, shapes: dict[str, tuple[int, ...]]):
        self.size, self.shapes = size, {k: tuple(v) for k, v in shapes.items()}
        self.arrays = {k: np.zeros((size, *shape), dtype=np.float32) for k, shape in self.shapes.items()}
        self.written_step = np.full(size, -1, dtype=np.int64)  # training step of the last write, -1 = never
        self.writes = np.zeros(size, dtype=np.int64)
        self.step = 0  # latest training step seen in a write

    def write(self, idx: np.ndarray, step: int, **fields: np.ndarray) -> None:
        missing = set(self.shapes) - set(fields)
        if missing:
            raise ValueError(f"write is missing fields {sorted(missing)}")
        for k, v in fields.items():
            self.arrays[k][idx] = v
        self.written_step[idx] = step
        self.writes[idx] += 1
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
        """Write every slot to ``directory/bank_step_<step>.arrow`` (atomically: temp file, then move)."""
        fs, base = fs_and_path(directory)
        fs.create_dir(base, recursive=True)
        cols = {
            k: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), int(np.prod(a.shape[1:])))
            for k, a in self.arrays.items()
        }
        cols["written_step"] = pa.array(self.written_step)
        cols["writes"] = pa.array(self.writes)
        meta = {
            "step": str(step),
            "size": str(self.size),
            **{f"shape:{k}": ",".join(map(str, s)) for k, s in self.shapes.items()},
        }
        table = pa.table(cols).replace_schema_metadata(meta)
        path, tmp = f"{base}/{snapshot_name(step)}", f"{base}/.{snapshot_name(step)}.tmp"
        with fs.open_output_stream(tmp) as out, ipc.new_file(out, table.schema) as writer:
            writer.write_table(table)
        fs.move(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> tuple[SlotStore, int]:
        """The store saved at ``path`` and the step it was tagged with."""
        fs, p = fs_and_path(path)
        with fs.open_input_file(p) as f:
            table = ipc.open_file(f).read_all()
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        shapes = {k[6:]: tuple(int(x) for x in v.split(",") if x) for k, v in meta.items() if k.startswith("shape:")}
        store = cls(int(meta["size"]), shapes)
        for k, shape in shapes.items():
            flat = table.column(k).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            store.arrays[k][:] = flat.reshape(store.size, *shape)
        store.written_step[:] = table.column("written_step").to_numpy()
        store.writes[:] = table.column("writes").to_numpy()
        step = int(meta["step"])
        store.step = step
        return store, step


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
    lease_id: int
    owner: str
    idx: np.ndarray
    expires_at: float


class Bank:
    """The HDEBM bank: N entries (z1, z2, X⁻) leased to workers in disjoint batches."""

    def __init__(self, size: int, shapes: dict[str, tuple[int, ...]], seed: int = 0, lease_timeout_s: float = 600.0):
        self.store = SlotStore(size, shapes)
        self.rng = np.random.default_rng(seed)
        self.lease_timeout_s = lease_timeout_s
        self.leases: dict[int, Lease] = {}
        self.leased = np.zeros(size, dtype=bool)
        self._ids = itertools.count(1)
        self.seq = 0  # a counter over checkouts and commits, for ordering tests and diagnostics
        self.reclaimed = 0
        self.rejected_commits = 0

    @property
    def size(self) -> int:
        return self.store.size

    def _release(self, lease: Lease) -> None:
        self.leased[lease.idx] = False
        del self.leases[lease.lease_id]

    def _reclaim(self, owner: str) -> None:
        now = time.monotonic()
        for lease in list(self.leases.values()):
            if lease.owner == owner or lease.expires_at < now:
                self._release(lease)
                self.reclaimed += 1

    def checkout(self, n: int, owner: str) -> dict:
        """n distinct slots no other lease holds, with their data; the owner's older leases are dropped."""
        self._reclaim(owner)
        free = np.flatnonzero(~self.leased)
        if len(free) < n:
            raise RuntimeError(f"bank has {len(free)} free slots, {n} requested ({len(self.leases)} leases out)")
        idx = np.sort(self.rng.choice(free, size=n, replace=False))
        lease = Lease(next(self._ids), owner, idx, time.monotonic() + self.lease_timeout_s)
        self.leases[lease.lease_id] = lease
        self.leased[idx] = True
        self.seq += 1
        return {"lease": lease.lease_id, "idx": idx, "seq": self.seq, **self.store.read(idx)}

    def commit(self, lease_id: int, step: int, **fields: np.ndarray) -> dict:
        """Overwrite exactly the leased slots and release them; a reclaimed lease's commit is refused."""
        lease = self.leases.get(lease_id)
        if lease is None:
            self.rejected_commits += 1
            return {"ok": False, "seq": self.seq}
        self.store.write(lease.idx, step, **fields)
        self._release(lease)
        self.seq += 1
        return {"ok": True, "seq": self.seq}

    def fill(self, start: int, step: int = 0, **fields: np.ndarray) -> None:
        """Initialise slots [start, start + len) (bank initialisation from G(z) in batches)."""
        n = len(next(iter(fields.values())))
        self.store.write(np.arange(start, start + n), step, **fields)

    def is_filled(self) -> bool:
        return bool((self.store.written_step >= 0).all())

    def stats(self) -> dict[str, float]:
        return {
            **self.store.stats(),
            "leases_out": len(self.leases),
            "reclaimed_leases": self.reclaimed,
            "rejected_commits": self.rejected_commits,
        }

    def load_store(self, store: SlotStore) -> None:
        """Replace the contents (restore); outstanding leases are void."""
        self.store = store
        self.leases.clear()
        self.leased[:] = False


class ReplayBuffer:
    """Replay buffer of chain states with re-initialisation probability ρ (M-EBM ρ = 5%, Improved CD 0.1%).

    New samples are pushed in ring order until full, then overwrite uniformly random slots. ``sample`` returns
    buffer states and a mask of which chains the caller must re-initialise from its initial distribution
    (the buffer does not know p0, which may live on a GPU).
    """

    def __init__(self, size: int, shapes: dict[str, tuple[int, ...]], reinit_prob: float, seed: int = 0):
        self.store = SlotStore(size, shapes)
        self.reinit_prob = reinit_prob
        self.rng = np.random.default_rng(seed)
        self.count = 0  # entries pushed so far (filled = min(count, size))

    @property
    def size(self) -> int:
        return self.store.size

    def sample(self, n: int) -> dict:
        filled = min(self.count, self.size)
        reinit = self.rng.random(n) < self.reinit_prob
        if filled == 0:
            reinit[:] = True
            idx = np.zeros(n, dtype=np.int64)
        else:
            idx = self.rng.integers(0, filled, size=n)
        return {"idx": idx, "reinit": reinit, **self.store.read(idx)}

    def push(self, step: int, **fields: np.ndarray) -> None:
        n = len(next(iter(fields.values())))
        ring = np.arange(self.count, self.count + n) % self.size
        full = self.count + np.arange(n) >= self.size
        idx = np.where(full, self.rng.integers(0, self.size, size=n), ring)
        self.store.write(idx, step, **fields)
        self.count += n

    def stats(self) -> dict[str, float]:
        return {**self.store.stats(), "pushed": self.count}

    def load_store(self, store: SlotStore) -> None:
        self.store = store
        self.count = int((store.written_step >= 0).sum())


class BankService:
    """What the bank actor serves, usable in-process too: a Bank or ReplayBuffer plus its snapshot directory.

    Snapshots are named by training step; the last ``keep`` are kept so that whichever checkpoint Ray restores
    (possibly one older than the newest) finds the bank state of the same step.
    """

    def __init__(
        self,
        kind: str,
        size: int,
        shapes: dict[str, tuple[int, ...]],
        snapshot_dir: str | None,
        seed: int = 0,
        lease_timeout_s: float = 600.0,
        reinit_prob: float = 0.0,
        keep: int = 3,
    ):
        if kind == "bank":
            self.core = Bank(size, shapes, seed=seed, lease_timeout_s=lease_timeout_s)
        elif kind == "replay":
            self.core = ReplayBuffer(size, shapes, reinit_prob=reinit_prob, seed=seed)
        else:
            raise ValueError(f"unknown bank kind {kind!r}")
        self.kind, self.snapshot_dir, self.keep = kind, snapshot_dir, keep
        self.loaded_snapshot_step: int | None = None

    # Bank mode
    def checkout(self, n: int, owner: str) -> dict:
        out = self.core.checkout(n, owner)
        out["written"] = self.core.store.written_step[out["idx"]] >= 0
        return out

    def commit(self, lease_id: int, step: int, fields: dict) -> dict:
        return self.core.commit(lease_id, step, **fields)

    def fill(self, start: int, step: int, fields: dict) -> None:
        self.core.fill(start, step, **fields)

    # Replay mode
    def sample(self, n: int) -> dict:
        return self.core.sample(n)

    def push(self, step: int, fields: dict) -> None:
        self.core.push(step, **fields)

    # Both
    def stats(self) -> dict:
        return {**self.core.stats(), "loaded_snapshot_step": self.loaded_snapshot_step}

    def snapshot(self, step: int) -> str:
        if not self.snapshot_dir:
            raise RuntimeError("this bank has no snapshot directory")
        path = self.core.store.snapshot(self.snapshot_dir, step)
        steps = sorted(list_snapshots(self.snapshot_dir))
        prune_snapshots(self.snapshot_dir, set(steps[-self.keep :]))
        return path

    def restore(self, step: int | None = None) -> int | None:
        """Load the snapshot of ``step`` (default: the latest); returns the loaded step, None if there is none."""
        snaps = list_snapshots(self.snapshot_dir) if self.snapshot_dir else {}
        if step is None:
            step = max(snaps) if snaps else None
        if step is None or step not in snaps:
            return None
        store, loaded = SlotStore.load(snaps[step])
        self.core.load_store(store)
        self.loaded_snapshot_step = loaded
        return loaded


def as_numpy(fields: dict) -> dict:
    """Tensors (any device) to float32 numpy arrays, as the store keeps them."""
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in fields.items()}


class LocalBankClient:
    """The in-process bank used by ``run_in_process`` and tests; same calls as the Ray actor client."""

    def __init__(self, service: BankService, owner: str = "rank0"):
        self.service, self.owner = service, owner

    def checkout(self, n: int):
        return self.service.checkout(n, self.owner)

    def wait(self, handle):
        return handle

    def commit(self, lease_id: int, step: int, **fields) -> bool:
        return self.service.commit(lease_id, step, as_numpy(fields))["ok"]

    def fill(self, start: int, step: int, **fields) -> None:
        self.service.fill(start, step, as_numpy(fields))

    def sample(self, n: int):
        return self.service.sample(n)

    def push(self, step: int, **fields) -> None:
        self.service.push(step, as_numpy(fields))

    def stats(self) -> dict:
        return self.service.stats()

    def snapshot(self, step: int) -> str:
        return self.service.snapshot(step)

    def restore(self, step: int | None = None) -> int | None:
        return self.service.restore(step)
