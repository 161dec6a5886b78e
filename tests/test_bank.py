"""The bank and replay buffer: leases, commits, reclaiming, snapshots, re-initialisation; and the real actor
under 4 concurrent Ray workers."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import ray

from hdebm_ray.bank.service import Bank, BankService, ReplayBuffer
from hdebm_ray.bank.store import SlotStore, list_snapshots
from hdebm_ray.distributed.bank_actor import create_bank_actor

SHAPES = {"z1": (4,), "x": (1, 3, 3)}


def _fields(n, value):
    return {"z1": np.full((n, 4), value, np.float32), "x": np.full((n, 1, 3, 3), value, np.float32)}


def test_leases_are_disjoint_and_commits_land_in_their_slots():
    bank = Bank(64, SHAPES, seed=0)
    a, b = bank.checkout(24, "a"), bank.checkout(24, "b")
    assert not set(a["idx"]) & set(b["idx"])
    with pytest.raises(RuntimeError, match="free slots"):
        bank.checkout(17, "c")  # only 16 left
    assert bank.commit(a["lease"], 5, **_fields(24, 1.0))["ok"]
    assert bank.commit(b["lease"], 5, **_fields(24, 2.0))["ok"]
    x = bank.store.arrays["x"][:, 0, 0, 0]
    assert (x[a["idx"]] == 1).all() and (x[b["idx"]] == 2).all()
    others = np.setdiff1d(np.arange(64), np.concatenate([a["idx"], b["idx"]]))
    assert (x[others] == 0).all() and (bank.store.written_step[others] == -1).all()
    assert not bank.commit(a["lease"], 6, **_fields(24, 9.0))["ok"]  # a lease commits once


def test_dead_owner_lease_is_reclaimed_and_its_late_commit_refused():
    bank = Bank(16, SHAPES, lease_timeout_s=0.2)
    dead = bank.checkout(8, "dead")
    bank.checkout(8, "live")
    with pytest.raises(RuntimeError):
        bank.checkout(8, "other")
    time.sleep(0.3)
    again = bank.checkout(8, "other")  # the expired leases are reclaimed
    assert bank.stats()["reclaimed_leases"] == 2
    assert not bank.commit(dead["lease"], 1, **_fields(8, 5.0))["ok"]  # the slots may now belong to others
    # A restarted owner (same rank name) frees its own stale lease at once, without waiting for the timeout.
    bank2 = Bank(8, SHAPES)
    bank2.checkout(8, "rank1")
    assert len(bank2.checkout(8, "rank1")["idx"]) == 8
    assert again["idx"].size == 8


def _steps(bank, first, last, owners=("rank0", "rank1"), n=8, skip=()):
    """Steps first..last: each owner leases n slots and commits them with the step, except (step, owner) in skip."""
    for step in range(first, last + 1):
        leases = {o: bank.checkout(n, o) for o in owners}
        for owner, lease in leases.items():
            if (step, owner) not in skip:
                assert bank.commit(lease["lease"], step, **_fields(n, float(step)))["ok"]


def test_audit_finds_a_lost_commit_and_a_double_write_and_survives_a_restore(tmp_path):
    bank = Bank(32, SHAPES, seed=1)
    bank.fill(0, 0, **_fields(32, 0.0))
    _steps(bank, 1, 6)
    assert bank.audit(6, 16) == []
    assert "slots written after step 5" in bank.audit(5, 16)[0]
    snap = bank.store.snapshot(str(tmp_path), 6)
    _steps(bank, 7, 8, skip={(8, "rank1")})  # rank1's commit of step 8 never lands
    (lost,) = bank.audit(8, 16)
    assert lost == "1 step(s) without exactly 16 slot writes (step 8: 8)"
    # Back to the snapshot of step 6 (what a worker-group restart does), then steps 7 and 8 again: clean.
    bank.load_store(SlotStore.load(snap)[0])
    assert bank.audit(6, 16) == []
    _steps(bank, 7, 8)
    assert bank.audit(8, 16) == []
    # Two committers writing one slot in one step is found, even when the per-step count is right.
    small = Bank(8, SHAPES)
    small.fill(0, 0, **_fields(8, 0.0))
    for owner in ("rank0", "rank1"):  # each leases all 8 slots in turn and commits them with step 1
        assert small.commit(small.checkout(8, owner)["lease"], 1, **_fields(8, 1.0))["ok"]
    assert small.audit(1, 16) == ["8 write(s) to a slot already written in the same step"]
    again = SlotStore.load(small.store.snapshot(str(tmp_path), 1))[0]
    assert again.double_writes == 8 and np.array_equal(again.step_writes, small.store.step_writes)


def test_a_checkout_for_a_step_avoids_slots_already_committed_in_it():
    # Ranks' calls reach the bank in any order: rank1's checkout for step 3 may arrive after rank0's commit of it.
    bank = Bank(32, SHAPES, seed=2)
    bank.fill(0, 0, **_fields(32, 0.0))
    first = bank.checkout(8, "rank0", step=3)
    bank.commit(first["lease"], 3, **_fields(8, 3.0))
    for seed in range(20):
        bank.rng = np.random.default_rng(seed)
        later = bank.checkout(8, "rank1", step=3)
        assert not set(later["idx"]) & set(first["idx"])
    bank.commit(later["lease"], 3, **_fields(8, 3.0))
    assert bank.audit(3, 16) == ["2 step(s) without exactly 16 slot writes (step 1: 0, step 2: 0)"]


def test_the_audit_counts_only_where_its_counts_are_complete(tmp_path):
    """A refill or a fallback to an older snapshot (``counts_from``), and a snapshot written before the counts
    existed, are audited from their step on; a fresh start on a used bank starts its counts afresh."""
    bank = Bank(16, SHAPES, seed=3)
    bank.fill(0, 0, **_fields(16, 0.0))
    _steps(bank, 1, 3, n=4)
    bank.reset()  # a worker group that died before its first checkpoint starts over on the same actor
    bank.fill(0, 0, **_fields(16, 0.0))
    _steps(bank, 1, 2, n=4)
    assert bank.audit(2, 8) == []
    bank.reset()  # no usable snapshot at step 6: refilled from G, counted from 6 on
    bank.fill(0, 0, **_fields(16, 0.0))
    bank.store.audit_from = 6
    _steps(bank, 7, 8, n=4)
    assert bank.audit(8, 8) == []
    assert bank.audit(8, 4) == ["2 step(s) without exactly 4 slot writes (step 7: 8, step 8: 8)"]
    # a snapshot from before the counts: its metadata has none, so they count from its step
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = bank.store.snapshot(str(tmp_path), 8)
    table = ipc.open_file(pa.memory_map(path)).read_all()
    meta = {k: v for k, v in table.schema.metadata.items() if k not in (b"step_writes", b"audit_from")}
    with ipc.new_file(path, table.schema.with_metadata(meta)) as w:
        w.write_table(table.replace_schema_metadata(meta))
    old, _ = SlotStore.load(path)
    assert old.audit_from == 8 and len(old.step_writes) == 0
    bank.load_store(old)
    _steps(bank, 9, 9, n=4)
    assert bank.audit(9, 8) == []


def test_calls_from_before_a_restart_and_an_unfilled_snapshot_are_refused(tmp_path):
    from hdebm_ray.bank.client import LocalBankClient
    from hdebm_ray.bank.service import BankRestarted

    old = BankService("bank", 16, SHAPES, str(tmp_path))
    client = LocalBankClient(old)
    client.pin()
    client.fill(0, 0, **_fields(16, 1.0))
    client.snapshot(2)
    restarted = BankService("bank", 16, SHAPES, str(tmp_path))  # what Ray brings back: empty, a new generation
    client.service = restarted
    for call in (lambda: client.snapshot(4), lambda: client.fill(0, 0, **_fields(16, 2.0)), lambda: client.restore(2)):
        with pytest.raises(BankRestarted, match="restarted and is empty"):
            call()
    with pytest.raises(BankRestarted):
        client.wait(client.checkout(4))  # its leases show the new generation
    assert not list_snapshots(str(tmp_path)).keys() - {2}  # no snapshot of the empty bank was written
    # An unfilled bank's snapshot (from any path) is passed over on restore.
    restarted.core.store.snapshot(str(tmp_path), 3)
    assert restarted.restore(3) == 2 and "never-written slots" in restarted.rejected[0]


def test_a_lease_from_before_a_restart_is_refused_by_the_restarted_bank():
    old = BankService("bank", 16, SHAPES, None)
    stale = old.checkout(8, "rank0")
    new = BankService("bank", 16, SHAPES, None)  # the restarted actor: same arguments, empty
    mine = new.checkout(8, "rank1")
    assert stale["generation"] != new.generation == mine["generation"]
    # The retried commit of rank0's old lease must not land in the slots rank1 now holds.
    assert not new.commit(stale["lease"], 1, _fields(8, 5.0))["ok"]
    assert new.commit(mine["lease"], 1, _fields(8, 1.0))["ok"]
    assert (new.core.store.arrays["x"][mine["idx"], 0, 0, 0] == 1.0).all()


def test_snapshot_restores_bit_identically(tmp_path):
    rng = np.random.default_rng(0)
    store = SlotStore(50, SHAPES)
    store.write(
        np.arange(50),
        7,
        z1=rng.standard_normal((50, 4), dtype=np.float32),
        x=rng.standard_normal((50, 1, 3, 3), dtype=np.float32),
    )
    store.write(np.arange(10), 9, **_fields(10, np.float32(np.pi)))
    path = store.snapshot(str(tmp_path), 9)
    loaded, step = SlotStore.load(path)
    assert step == 9 and list_snapshots(str(tmp_path)) == {9: path}
    for k in SHAPES:
        assert loaded.arrays[k].tobytes() == store.arrays[k].tobytes()
    assert (loaded.written_step == store.written_step).all() and (loaded.writes == store.writes).all()


def test_restore_passes_over_a_truncated_or_mismatched_snapshot_to_the_newest_usable_one(tmp_path, capsys):
    service = BankService("bank", 16, SHAPES, str(tmp_path), keep=5)
    for step in (2, 4, 6):
        service.fill(0, step, _fields(16, float(step)))
        service.snapshot(step)
    snaps = list_snapshots(str(tmp_path))
    data = open(snaps[6], "rb").read()
    open(snaps[6], "wb").write(data[: len(data) // 2])  # the newest cut short
    other = SlotStore(32, SHAPES)  # another bank size under step 4's name
    other.write(np.arange(32), 4, **_fields(32, 4.0))
    os.replace(other.snapshot(str(tmp_path / "other"), 4), snaps[4])
    assert service.restore(6) == 2 and service.core.store.arrays["x"].max() == 2.0
    assert len(service.rejected) == 2 and "cannot be read" in service.rejected[0]
    assert "holds 32 slots" in service.rejected[1] and "bank_size" in service.rejected[1]
    assert "trying an older snapshot" in capsys.readouterr().out
    assert service.restore(4) == 2 and service.stats()["rejected_snapshots"] == 3
    open(snaps[2], "wb").write(b"not arrow")
    assert service.restore(6) is None  # nothing usable: the caller refills, no crash loop


def test_replay_reinit_count_lies_in_binomial_bound():
    n, rho = 20000, 0.05
    buf = ReplayBuffer(1000, SHAPES, reinit_prob=rho, seed=3)
    buf.fill(0, 0, **_fields(1000, 1.0))
    # 20 leases of all 1000 slots (each call drops the owner's previous lease)
    count = sum(int(buf.sample(1000)["reinit"].sum()) for _ in range(n // 1000))
    assert abs(count - n * rho) <= 4 * math.sqrt(n * rho * (1 - rho))
    empty = ReplayBuffer(10, SHAPES, reinit_prob=rho)
    assert empty.sample(5)["reinit"].all()  # nothing to replay yet: every chain starts from chain_init


def _run_chains(buf: ReplayBuffer, steps: int, batch: int, owners: int = 2) -> None:
    """``steps`` rounds of ``owners`` concurrent leases (as ranks take them), each chain end = its start + 1."""
    for step in range(steps):
        leases = [buf.sample(batch, owner=f"rank{r}") for r in range(owners)]
        for lease in leases:
            x = np.where(lease["reinit"][:, None, None, None], 0.0, lease["x"] + 1.0).astype(np.float32)
            assert buf.push(lease["lease"], step + 1, z1=lease["z1"], x=x)


def test_in_place_write_back_keeps_every_chain_a_distinct_lineage():
    # M-EBM / JEM: N persistent chains. With rho = 0 no lineage may be lost over many steps, and every chain end
    # goes back into the slot it came from: each slot's x counts how often that chain was continued.
    n, batch = 256, 16
    buf = ReplayBuffer(n, SHAPES, reinit_prob=0.0, seed=1, write_policy="in_place")
    buf.fill(0, 0, **_fields(n, 0.0))
    _run_chains(buf, 400, batch)
    assert len(np.unique(buf.store.lineage)) == n and buf.stats()["distinct_lineages"] == n
    assert np.array_equal(buf.store.arrays["x"][:, 0, 0, 0], buf.store.writes - 1)  # fill + one per continuation
    assert buf.store.writes.sum() == n + 400 * 2 * batch


def test_random_overwrite_collapses_lineages_and_fifo_overwrites_the_oldest():
    # What the buffer did before it had a write policy: chain ends into random slots. The persistent chains
    # collapse onto few lineages (with rho = 0 a lost lineage never comes back).
    n, batch = 256, 16
    buf = ReplayBuffer(n, SHAPES, reinit_prob=0.0, seed=1, write_policy="random")
    buf.fill(0, 0, **_fields(n, 0.0))
    _run_chains(buf, 400, batch)
    assert buf.stats()["distinct_lineages"] < n // 4
    # Improved CD's ring: starts empty (fresh chains, appended), then each push replaces the oldest entries.
    fifo = ReplayBuffer(10, SHAPES, reinit_prob=0.0, seed=0, write_policy="fifo")
    first = fifo.sample(6)
    assert first["reinit"].all() and first["filled"] == 0
    fifo.push(first["lease"], 1, **_fields(6, 1.0))
    second = fifo.sample(6)  # 6 of the 6 filled slots
    assert sorted(second["idx"].tolist()) == list(range(6))
    fifo.push(second["lease"], 2, **_fields(6, 2.0))
    x = fifo.store.arrays["x"][:, 0, 0, 0]
    assert (x[[0, 1]] == 2).all() and (x[2:6] == 1).all() and (x[6:] == 2).all() and fifo.count == 12


def test_reservoir_keeps_a_uniform_sample_of_every_chain_end_pushed():
    # Improved CD's ReservoirBuffer: after 10x its size in pushes, the 100 slots hold a uniform sample of all 1000
    # ends, so about half come from the first 500 (a ring would hold the last 100 only).
    buf = ReplayBuffer(100, SHAPES, reinit_prob=0.0, seed=5, write_policy="reservoir")
    for step in range(100):
        lease = buf.sample(10)
        assert buf.push(lease["lease"], step, **_fields(10, float(step)))
    from_first_half = int((buf.store.arrays["x"][:, 0, 0, 0] < 50).sum())
    assert buf.count == 1000 and 30 <= from_first_half <= 70, from_first_half


def test_in_place_buffer_without_prefill_fills_with_fresh_chains_before_continuing_any():
    buf = ReplayBuffer(64, SHAPES, reinit_prob=0.0, seed=6, write_policy="in_place")
    for step in range(4):  # 4 x 16 fresh chains fill the 64 slots, each once
        lease = buf.sample(16)
        assert lease["reinit"].all() and buf.push(lease["lease"], step, **_fields(16, float(step)))
    assert buf.filled() == 64 and (buf.store.writes == 1).all()
    assert not buf.sample(16)["reinit"].any()  # full: from now on the chains persist


def test_concurrent_replay_leases_hold_distinct_chains_and_stale_pushes_are_refused():
    buf = ReplayBuffer(64, SHAPES, reinit_prob=0.0, seed=2)
    buf.fill(0, 0, **_fields(64, 0.0))
    a, b = buf.sample(32, owner="rank0"), buf.sample(32, owner="rank1")
    assert not set(a["idx"].tolist()) & set(b["idx"].tolist())
    again = buf.sample(8, owner="rank0")  # rank 0 restarted: its old lease is void
    assert not buf.push(a["lease"], 1, **_fields(32, 5.0))
    assert buf.push(again["lease"], 1, **_fields(8, 5.0)) and buf.push(b["lease"], 1, **_fields(32, 5.0))
    # a ring still filling: another rank holds every filled chain, so this lease's chains all start fresh
    ring = ReplayBuffer(64, SHAPES, reinit_prob=0.0, seed=2, write_policy="fifo")
    ring.fill(0, 0, **_fields(16, 0.0))
    held, starved = ring.sample(16, owner="rank0"), ring.sample(16, owner="rank1")
    assert not held["reinit"].any() and starved["reinit"].all() and (starved["idx"] == -1).all()
    assert ring.push(starved["lease"], 1, **_fields(16, 1.0)) and ring.count == 32


def test_replay_snapshot_keeps_lineages_and_ring_position(tmp_path):
    buf = ReplayBuffer(32, SHAPES, reinit_prob=0.5, seed=4, write_policy="fifo")
    _run_chains(buf, 5, 8)
    path = buf.store.snapshot(str(tmp_path), 5)
    restored = ReplayBuffer(32, SHAPES, reinit_prob=0.5, seed=4, write_policy="fifo")
    restored.load_store(SlotStore.load(path)[0])
    assert restored.count == buf.count == 80
    assert np.array_equal(restored.store.lineage, buf.store.lineage)
    assert restored.store.counters["next_lineage"] == buf.store.counters["next_lineage"]


# -- the real actor --------------------------------------------------------------------------------------------


@ray.remote(num_cpus=1)
def _worker(name: str, worker: int, rounds: int, n: int):
    from hdebm_ray.distributed.bank_actor import ActorBankClient

    client = ActorBankClient(name, owner=f"w{worker}")
    log = []
    for r in range(rounds):
        lease = client.wait(client.checkout(n))
        marker = worker * 10000 + r
        out = ray.get(client.actor.commit.remote(lease["lease"], r, _fields(n, float(marker))))
        assert out["ok"]
        log.append((lease["seq"], out["seq"], lease["idx"].tolist(), marker))
    return log


def test_four_concurrent_workers_never_share_a_slot(ray_local, tmp_path):
    name = "bank-test-concurrency"
    actor = create_bank_actor(name, kind="bank", size=64, shapes=SHAPES, snapshot_dir=str(tmp_path))
    ray.get(actor.fill.remote(0, 0, _fields(64, -1.0)))
    logs = ray.get([_worker.remote(name, w, 40, 12) for w in range(4)])
    intervals: dict[int, list] = {}
    for log in logs:
        for seq_out, seq_in, idx, marker in log:
            for i in idx:
                intervals.setdefault(i, []).append((seq_out, seq_in, marker))
    for slot, spans in intervals.items():
        spans.sort()
        for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
            assert end < start, f"slot {slot} held by two leases at once"
    # Every slot holds what its last committer wrote.
    path = ray.get(actor.snapshot.remote(999))
    store, _ = SlotStore.load(path)
    for slot, spans in intervals.items():
        last_marker = max(spans, key=lambda s: s[1])[2]
        assert store.arrays["x"][slot, 0, 0, 0] == last_marker
        assert (store.arrays["z1"][slot] == last_marker).all()
    assert sum(len(log) for log in logs) == 160
    ray.kill(actor)


@ray.remote(num_cpus=1, max_retries=0)
def _checkout_and_die(name: str):
    from hdebm_ray.distributed.bank_actor import ActorBankClient

    client = ActorBankClient(name, owner="doomed")
    client.wait(client.checkout(8))
    os._exit(1)


def test_dead_ray_worker_lease_is_reclaimed(ray_local, tmp_path):
    name = "bank-test-reclaim"
    actor = create_bank_actor(name, kind="bank", size=16, shapes=SHAPES, snapshot_dir=None, lease_timeout_s=1.0)
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(_checkout_and_die.remote(name))
    assert ray.get(actor.stats.remote())["leases_out"] == 1
    ray.get(actor.checkout.remote(8, "alive"))
    time.sleep(1.2)
    got = ray.get(actor.checkout.remote(8, "newcomer"))  # only possible once the dead worker's lease is back
    assert len(got["idx"]) == 8
    ray.kill(actor)
