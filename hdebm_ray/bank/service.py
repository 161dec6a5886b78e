"""The shared sample store, pure numpy: HDEBM's latent/image bank and the baselines' replay buffer, both on a
``SlotStore`` (``slot_store.py``: the arrays, their snapshots and the lease table).

``Bank`` leases slots (docs/algorithms.md §5, distributed reading): ``checkout(n, owner)`` hands out n slots that
no other outstanding lease holds; ``commit(lease, ...)`` overwrites exactly those slots and releases them. A lease
whose owner died is reclaimed when it expires, or as soon as the same owner (a restarted rank) checks out again.

``ReplayBuffer`` (M-EBM, Improved CD) samples chain starts, re-initialising each with probability ρ, and takes new
samples back. The Ray actor in ``distributed/bank_actor.py`` wraps either one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..io.checkpoint import checkpoint_steps
from .store import LeaseTable, SlotStore, SnapshotError, draw_free, list_snapshots, prune_snapshots


@dataclass(frozen=True)
class BankSpec:
    """What a stage's shared store holds (a stage declares it: ``StageBase.bank_spec``): Stage 1's bank of N
    entries of (z1, z2, X⁻), or a baseline's replay buffer of N chain states."""

    kind: str  # "bank" or "replay"
    size: int  # N slots
    shapes: dict[str, tuple[int, ...]]  # each field's shape per slot
    reinit_prob: float = 0.0  # replay: rho, the chains restarted from chain_init
    write_policy: str = "in_place"  # replay: where chain ends go (``ReplayBuffer``)

    def arguments(self) -> dict:
        """``BankService``'s keyword arguments for this store."""
        return dataclasses.asdict(self)

    def nbytes(self) -> int:
        """Bytes of the store's float32 fields (what restoring or snapshotting it holds, plus one batch)."""
        return self.size * sum(4 * int(np.prod(shape)) for shape in self.shapes.values())


class Bank:
    """The HDEBM bank: N entries (z1, z2, X⁻) leased to workers in disjoint batches."""

    def __init__(self, size: int, shapes: dict[str, tuple[int, ...]], seed: int = 0, lease_timeout_s: float = 600.0):
        self.store = SlotStore(size, shapes)
        self.rng = np.random.default_rng(seed)
        self.table = LeaseTable(size, lease_timeout_s)
        self.seq = 0  # a counter over checkouts and commits, for ordering tests and diagnostics

    @property
    def size(self) -> int:
        return self.store.size

    def checkout(self, n: int, owner: str, step: int | None = None) -> dict:
        """n distinct slots no other lease holds, with their data; the owner's older leases are dropped. With
        ``step`` (the step the lease will be committed with), not slots another rank already committed in that
        step, while enough others are free: calls from different ranks reach the bank in any order."""
        self.table.reclaim(owner)
        candidates = np.arange(self.size)
        if step is not None:
            fresh = candidates[self.store.written_step != step]
            if len(self.table.free(fresh)) >= n:
                candidates = fresh
        idx = draw_free(self.rng, self.table, candidates, n, "bank")
        lease = self.table.grant(owner, idx)
        self.seq += 1
        return {"lease": lease.lease_id, "idx": idx, "seq": self.seq, **self.store.read(idx)}

    def commit(self, lease_id: str, step: int, **fields: np.ndarray) -> dict:
        """Overwrite exactly the leased slots and release them; a reclaimed lease's commit is refused."""
        lease = self.table.take(lease_id)
        if lease is None:
            return {"ok": False, "seq": self.seq}
        self.store.count_writes(lease.idx, step)
        self.store.write(lease.idx, step, **fields)
        self.seq += 1
        return {"ok": True, "seq": self.seq}

    def fill(self, start: int, step: int = 0, **fields: np.ndarray) -> None:
        """Initialise slots [start, start + len) (bank initialisation from G(z) in batches)."""
        n = len(next(iter(fields.values())))
        self.store.count_writes(np.arange(start, start + n), step)
        self.store.write(np.arange(start, start + n), step, **fields)

    def reset(self) -> None:
        """Empty (before a fill from G): contents, counts and leases."""
        self.load_store(SlotStore(self.size, self.store.shapes))

    def is_filled(self) -> bool:
        return bool((self.store.written_step >= 0).all())

    def audit(self, last_step: int, global_batch: int) -> list[str]:
        """What breaks "every slot written by exactly one committer per step" in steps 1..last_step: a step with
        other than ``global_batch`` slot writes (a commit lost or applied twice), a slot written twice in one
        step, a slot written after ``last_step``, per-slot write counts that do not add up. [] when it holds."""
        store, problems = self.store, []
        counts = np.zeros(last_step + 1, dtype=np.int64)
        n = min(len(store.step_writes), last_step + 1)
        counts[:n] = store.step_writes[:n]
        first = store.audit_from + 1  # the counts are complete from there on
        wrong = np.flatnonzero(counts[first:] != global_batch) + first
        if len(wrong):
            shown = ", ".join(f"step {s}: {counts[s]}" for s in wrong[:5])
            problems.append(f"{len(wrong)} step(s) without exactly {global_batch} slot writes ({shown})")
        if store.double_writes:
            problems.append(f"{store.double_writes} write(s) to a slot already written in the same step")
        if (store.written_step > last_step).any() or len(store.step_writes) > last_step + 1:
            problems.append(f"slots written after step {last_step}")
        if (store.written_step < 0).any():
            problems.append(f"{int((store.written_step < 0).sum())} slot(s) never written")
        if store.audit_from == 0 and store.writes.sum() != store.step_writes.sum():
            problems.append(f"per-slot writes add up to {store.writes.sum()}, per-step to {store.step_writes.sum()}")
        return problems

    def stats(self) -> dict[str, float]:
        return {**self.store.stats(), **self.table.stats()}

    def load_store(self, store: SlotStore) -> None:
        """Replace the contents (restore); outstanding leases are void."""
        self.store = store
        self.table.clear()


WRITE_POLICIES = ("in_place", "fifo", "reservoir", "random")


class ReplayBuffer:
    """Replay buffer of N chain states with re-initialisation probability ρ (M-EBM ρ = 5%, Improved CD 0.1%).

    ``sample(n, owner)`` leases n distinct filled slots (distinct across all outstanding leases, so concurrent
    ranks never draw the same chain) and marks each for re-initialisation with probability ρ — the caller draws
    those from its initial distribution (the buffer does not know p0, which may live on a GPU). While fewer
    than n slots are filled, every chain is marked (and any chain no free slot is left for).
    ``push(lease, step, x)`` writes the chain ends back:

    - ``in_place`` (M-EBM / JEM code): into the slots they were drawn from, so the buffer holds N persistent
      chains; chains drawn from an unfilled buffer are appended instead;
    - ``reservoir`` (Improved CD code's default ReservoirBuffer): appended until full, then each new chain end
      replaces a random slot with probability size / (ends pushed so far): a uniform sample of every end;
    - ``fifo`` (Improved CD code's ReplayBuffer, ``--reservoir=False``): at the ring position, over the oldest;
    - ``random``: ring order until full, then uniformly random slots (chains collapse onto few lineages).

    Each slot carries a lineage id: a re-initialised chain gets a new one, a continued chain keeps its source's.
    """

    def __init__(
        self,
        size: int,
        shapes: dict[str, tuple[int, ...]],
        reinit_prob: float,
        seed: int = 0,
        write_policy: str = "in_place",
        lease_timeout_s: float = 600.0,
    ):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"unknown replay write policy {write_policy!r}; choose one of {', '.join(WRITE_POLICIES)}")
        self.store = SlotStore(size, shapes)
        self.store.counters = {"pushed": 0, "next_lineage": 0}
        self.reinit_prob, self.write_policy = reinit_prob, write_policy
        self.rng = np.random.default_rng(seed)
        self.table = LeaseTable(size, lease_timeout_s)

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def count(self) -> int:
        """Entries written so far (fills and pushes); filled slots = min(count, size)."""
        return self.store.counters["pushed"]

    def filled(self) -> int:
        return min(self.count, self.size)

    def fill(self, start: int, step: int = 0, **fields: np.ndarray) -> None:
        """Pre-fill slots [start, start + len) with fresh chains (M-EBM: N draws from p0), each its own lineage."""
        n = len(next(iter(fields.values())))
        idx = np.arange(start, start + n)
        self.store.write(idx, step, lineage=self._new_lineages(n), **fields)
        self.store.counters["pushed"] = max(self.count, start + n)

    def sample(self, n: int, owner: str = "rank0", extra: int = 0) -> dict:
        """Lease n chain starts; ``extra`` further filled states (read-only, e.g. Improved CD's entropy reference)."""
        self.table.reclaim(owner)
        filled = self.filled()
        reinit = self.rng.random(n) < self.reinit_prob
        idx = np.full(n, -1, dtype=np.int64)  # -1: a fresh chain, appended when pushed
        # Until the buffer holds a batch every chain starts fresh (Improved CD's code); an in-place buffer waits
        # until it is full (not pre-filled: fresh chains fill it), or its chains would never grow past a batch.
        if filled >= (self.size if self.write_policy == "in_place" else n):
            free = self.table.free(np.arange(filled))
            # Other ranks' leases can leave fewer free chains than asked for while a ring fills: the rest start fresh.
            take = min(n, len(free))
            idx[:take] = self.rng.choice(free, size=take, replace=False)
        reinit |= idx < 0
        held = idx[idx >= 0]
        lease = self.table.grant(owner, held, {"src": idx, "reinit": reinit})
        data = {k: np.zeros((n, *shape), np.float32) for k, shape in self.store.shapes.items()}
        for k, v in self.store.read(held).items():
            data[k][idx >= 0] = v
        out = {"lease": lease.lease_id, "idx": idx, "reinit": reinit, "filled": filled, **data}
        if extra:
            ref = self.rng.integers(0, max(filled, 1), size=extra) if filled else np.zeros(0, dtype=np.int64)
            out["reference"] = self.store.read(ref)
        return out

    def push(self, lease_id: str, step: int, **fields: np.ndarray) -> bool:
        """Write a lease's chain ends back by the write policy; False if the lease was reclaimed meanwhile."""
        lease = self.table.take(lease_id)
        if lease is None:
            return False
        src, reinit = lease.extra["src"], lease.extra["reinit"]
        n, count = len(src), self.count
        lineage = self.store.lineage[np.maximum(src, 0)].copy()
        fresh = reinit | (src < 0)
        lineage[fresh] = self._new_lineages(int(fresh.sum()))
        if self.write_policy == "in_place":
            dest = src.copy()
            dest[src < 0] = self._slots_for_new_chains(int((src < 0).sum()), exclude=src[src >= 0])
            appended = int(((dest >= count) & (src < 0)).sum())  # new slots filled (unfilled ones come first)
        elif self.write_policy == "fifo":
            dest, appended = (count + np.arange(n)) % self.size, n
        elif self.write_policy == "reservoir":
            # Classic reservoir sampling over every chain end ever pushed: the i-th replaces a random slot with
            # probability size / i (Improved CD's ReservoirBuffer), so the buffer is a uniform sample of them all.
            seen = count + np.arange(n)
            slot = np.where(seen < self.size, seen, self.rng.integers(0, seen + 1))
            dest, appended = np.where(slot < self.size, slot, -1), n
        else:
            full = count + np.arange(n) >= self.size
            dest, appended = (
                np.where(full, self.rng.integers(0, self.size, size=n), (count + np.arange(n)) % self.size),
                n,
            )
        kept = dest >= 0
        self.store.write(dest[kept], step, lineage=lineage[kept], **{k: v[kept] for k, v in fields.items()})
        self.store.counters["pushed"] = count + appended
        return True

    def _slots_for_new_chains(self, k: int, exclude: np.ndarray) -> np.ndarray:
        """In-place buffer: where k chains that came from no slot go — the unfilled slots first, then free
        (unleased) slots other than ``exclude``; -1 (dropped) if every slot is out."""
        dest = np.full(k, -1, dtype=np.int64)
        unfilled = np.arange(self.count, self.size)[:k]
        dest[: len(unfilled)] = unfilled
        rest = k - len(unfilled)
        if rest:
            taken = np.concatenate([exclude, unfilled])
            candidates = self.table.free(np.setdiff1d(np.arange(self.size), taken))
            pick = self.rng.choice(candidates, size=min(rest, len(candidates)), replace=False)
            dest[len(unfilled) : len(unfilled) + len(pick)] = pick
        return dest

    def _new_lineages(self, n: int) -> np.ndarray:
        first = self.store.counters["next_lineage"]
        self.store.counters["next_lineage"] = first + n
        return np.arange(first, first + n, dtype=np.int64)

    def stats(self) -> dict[str, float]:
        filled = self.store.written_step >= 0
        lineages = len(np.unique(self.store.lineage[filled])) if filled.any() else 0
        return {**self.store.stats(), **self.table.stats(), "pushed": self.count, "distinct_lineages": lineages}

    def load_store(self, store: SlotStore) -> None:
        self.store = store
        written = int((store.written_step >= 0).sum())
        store.counters.setdefault("pushed", written)
        store.counters.setdefault("next_lineage", int(store.lineage.max()) + 1 if written else 0)
        self.table.clear()


class BankRestarted(RuntimeError):
    """The bank / buffer actor died and Ray restarted it empty: this worker group's weights and the bank no longer
    belong to the same step. Raised to have Ray Train restart the group from its latest checkpoint, whose own
    snapshot rank 0 then restores."""


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
        write_policy: str = "in_place",
    ):
        if kind == "bank":
            self.core = Bank(size, shapes, seed=seed, lease_timeout_s=lease_timeout_s)
        elif kind == "replay":
            self.core = ReplayBuffer(
                size, shapes, reinit_prob, seed=seed, write_policy=write_policy, lease_timeout_s=lease_timeout_s
            )
        else:
            raise ValueError(f"unknown bank kind {kind!r}")
        self.kind, self.snapshot_dir, self.keep = kind, snapshot_dir, keep
        # New with every construction (a restarted actor's included) and unchanged by restores: a client pins it
        # when its stage starts, and a call or lease of another generation means the actor was restarted (empty)
        # behind the stage's back.
        self.generation = self.core.table.table_id
        self.loaded_snapshot_step: int | None = None
        self.rejected: list[str] = []  # snapshots ``restore`` found unusable, and why

    def current_generation(self) -> str:
        return self.generation

    def check_generation(self, generation: str | None) -> None:
        """``BankRestarted`` if the caller pinned another generation than this one (None: not pinned)."""
        if generation is not None and generation != self.generation:
            raise BankRestarted(
                f"the {'bank' if self.kind == 'bank' else 'replay buffer'} actor was restarted and is empty; "
                "the workers restart from their latest checkpoint and restore its snapshot"
            )

    # Bank mode
    def checkout(self, n: int, owner: str, step: int | None = None) -> dict:
        out = self.core.checkout(n, owner, step)
        out["written"] = self.core.store.written_step[out["idx"]] >= 0
        return {**out, "generation": self.generation}

    def commit(self, lease_id: str, step: int, fields: dict) -> dict:
        return self.core.commit(lease_id, step, **fields)

    def fill(self, start: int, step: int, fields: dict, generation: str | None = None) -> None:
        self.check_generation(generation)
        self.core.fill(start, step, **fields)

    def reset(self, generation: str | None = None) -> None:
        self.check_generation(generation)
        self.core.reset()

    def counts_from(self, step: int, generation: str | None = None) -> None:
        """The audit's counts are complete only after ``step`` (a refill, or an older snapshot than the step)."""
        self.check_generation(generation)
        self.core.store.audit_from = step

    # Replay mode
    def sample(self, n: int, owner: str, extra: int = 0) -> dict:
        return {**self.core.sample(n, owner, extra), "generation": self.generation}

    def push(self, lease_id: str, step: int, fields: dict) -> bool:
        return self.core.push(lease_id, step, **fields)

    def audit(self, last_step: int, global_batch: int, generation: str | None = None) -> list[str]:
        self.check_generation(generation)
        return self.core.audit(last_step, global_batch)

    # Both
    def stats(self) -> dict:
        return {
            **self.core.stats(),
            "loaded_snapshot_step": self.loaded_snapshot_step,
            "rejected_snapshots": len(self.rejected),
        }

    def snapshot(self, step: int, generation: str | None = None) -> str:
        self.check_generation(generation)  # never a snapshot of a restarted, empty bank
        if not self.snapshot_dir:
            raise RuntimeError("this bank has no snapshot directory")
        path = self.core.store.snapshot(self.snapshot_dir, step)
        steps = sorted(list_snapshots(self.snapshot_dir))
        # the newest few, and every one whose checkpoint is still there (waiting for the eval pool, which samples a
        # baseline's buffer from it)
        checkpoints = checkpoint_steps(self.snapshot_dir.rstrip("/").rsplit("/", 1)[0])
        prune_snapshots(self.snapshot_dir, set(steps[-self.keep :]) | checkpoints)
        return path

    def restore(self, step: int | None = None, generation: str | None = None) -> int | None:
        """Load the snapshot of ``step`` (default: the latest), verified (readable, this bank's size and fields,
        its step); if it is unusable, the newest usable older one (each snapshot belongs to a checkpoint of its
        step). Returns the loaded step, None if none is usable (the caller refills). ``rejected`` lists why
        snapshots were passed over."""
        self.check_generation(generation)
        snaps = list_snapshots(self.snapshot_dir) if self.snapshot_dir else {}
        store = self.core.store
        for candidate in sorted((s for s in snaps if step is None or s <= step), reverse=True):
            try:
                loaded_store, loaded = SlotStore.load(snaps[candidate])
                loaded_store.check_matches(store.size, store.shapes, candidate, snaps[candidate])
                unwritten = int((loaded_store.written_step < 0).sum())
                if self.kind == "bank" and unwritten:  # a bank is filled before its first snapshot
                    raise SnapshotError(f"bank snapshot '{snaps[candidate]}' has {unwritten} never-written slots")
            except SnapshotError as e:
                self.rejected.append(str(e))
                print(f"[bank] {e}; trying an older snapshot", flush=True)
                continue
            self.core.load_store(loaded_store)
            self.loaded_snapshot_step = loaded
            return loaded
        return None
