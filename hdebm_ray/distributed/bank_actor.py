"""The bank as a Ray actor: one shared store for all Train workers, created by the driver.

Created by name in the ``hdebm`` namespace with ``get_if_exists`` (so workers and a re-run driver find it) and
``max_restarts=-1``. A restarted actor comes back empty, with a new generation: the first worker whose lease
shows it raises ``BankRestarted``, Ray Train restarts the worker group from its latest checkpoint, and rank 0
restores that checkpoint's snapshot, so weights and bank again belong to one step (reloading the actor's own
latest snapshot instead could pair the bank of step S with weights of a later step). Data travel as numpy arrays
(zero-copy, read-only on arrival; the client copies before writing).
"""

from __future__ import annotations

import time
import warnings

import ray

from ..bank.client import BankClientBase, as_numpy
from ..bank.service import BankRestarted, BankService
from ..io.storage import RunStateError

NAMESPACE = "hdebm"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BankActor(BankService):
    def __init__(self, *args, run: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run  # the run it belongs to (``owner_check``)
        with warnings.catch_warnings():  # Ray 2.60's own property calls its deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed

    def run_identity(self) -> str:
        return self.run

    def stats(self) -> dict:
        return {**super().stats(), "reconstructed": float(self.reconstructed)}


def create_bank_actor(
    name: str,
    *,
    kind: str,
    size: int,
    shapes: dict,
    snapshot_dir: str | None,
    seed: int = 0,
    lease_timeout_s: float = 600.0,
    reinit_prob: float = 0.0,
    keep: int = 3,
    write_policy: str = "in_place",
    run: str = "",
    placement: dict | None = None,
):
    """Create (or find) the named bank actor, owned by the calling driver so it lives as long as the run, and check
    that a found one belongs to ``run`` (the run's identity). ``placement``: actor options that put it on a node that
    is not preemptible, and reserve the memory its store and a snapshot need (``cluster.stable_placement``)."""
    actor = BankActor.options(name=name, namespace=NAMESPACE, get_if_exists=True, **(placement or {})).remote(
        kind, size, shapes, snapshot_dir, seed, lease_timeout_s, reinit_prob, keep, write_policy, run=run
    )
    owner_check(actor, name, run)
    return actor


def owner_check(actor, name: str, run: str, timeout_s: float = 120.0) -> None:
    """A named actor found with ``get_if_exists`` proves it belongs to this run before it is used."""
    try:
        found = ray.get(actor.run_identity.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RunStateError(
            f"the actor {name!r} did not start within {timeout_s:g} s: no node can hold it (its memory, or a node "
            "not labelled ray.io/market-type=spot)?"
        ) from None
    if found != run:
        raise RunStateError(
            f"the actor {name!r} belongs to another run ({found or 'unnamed'}), not this one ({run}): was the run "
            "folder copied? Delete the copy's run.json to give it its own identity"
        )


class ActorBankClient(BankClientBase):
    """A Train worker's handle on the bank actor; ``checkout`` and ``commit_async`` are asynchronous so their
    round trips overlap the step. A ``BankRestarted`` from the actor arrives wrapped by Ray; it is re-raised as
    itself. A call that gets no answer within ``timeout_s`` (``ray.bank_timeout_s``) finds the bank stuck: it is
    restarted, which the workers treat as a dead bank (they resume from their checkpoint and its snapshot)."""

    def __init__(self, name: str, owner: str, timeout_s: float | None = None):
        self.actor, self.owner, self.name = ray.get_actor(name, namespace=NAMESPACE), owner, name
        self.timeout_s = timeout_s

    def _get(self, ref):
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.actor, no_restart=False)  # Ray restarts it, empty, with a new generation
            message = (
                f"the bank actor {self.name!r} did not answer within ray.bank_timeout_s = {self.timeout_s:g} s; it "
                "was restarted, and the workers resume from their latest checkpoint and its snapshot"
            )
            print(f"[bank] {message}", flush=True)  # Ray Train logs the worker's error only as a traceback
            raise BankRestarted(message) from None
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, BankRestarted):
                raise err.cause from None
            raise

    def _call(self, method: str, *args):
        return self._get(getattr(self.actor, method).remote(*args))

    def checkout(self, n: int, step: int | None = None):
        return self.actor.checkout.remote(n, self.owner, step)

    def wait(self, handle):
        return self.checked(self._get(handle))

    def commit(self, lease_id: str, step: int, **fields) -> bool:
        return self._get(self.commit_async(lease_id, step, **fields))["ok"]

    def commit_async(self, lease_id: str, step: int, **fields):
        return self.actor.commit.remote(lease_id, step, as_numpy(fields))  # arguments are serialised here


def kill_bank(bank, name: str, timeout_s: float = 60.0) -> None:
    """Kill the bank actor and wait until its name is free: ``ray.kill`` returns first, and the next attempt's
    ``get_if_exists`` would otherwise find the dying actor (with what was committed after a divergence)."""
    ray.kill(bank)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)
