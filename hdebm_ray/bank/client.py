"""The clients a stage holds on the bank / replay buffer (``contracts.BankClient`` / ``ReplayClient``): the shared
calls and the pinned generation (``BankClientBase``), and the in-process client (``LocalBankClient``); the Ray
actor's client is in ``distributed/bank_actor.py``."""

from __future__ import annotations

import numpy as np

from .service import BankService


def as_numpy(fields: dict) -> dict:
    """Tensors (any device) to float32 numpy arrays, as the store keeps them."""
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in fields.items()}


class BankClientBase:
    """What both clients (in process, Ray actor) share: every call but the asynchronous ones goes through
    ``_call(method, *args)`` on the service. The bank generation pinned when the stage started (``pin``) is sent
    with every call that must not reach a restarted bank, and compared with every lease (``checked``)."""

    owner: str
    generation: str | None = None

    def _call(self, method: str, *args):
        raise NotImplementedError

    def pin(self) -> str:
        self.generation = self._call("current_generation")
        return self.generation

    def checked(self, reply: dict) -> dict:
        if self.generation is not None and reply.get("generation", self.generation) != self.generation:
            self._call("check_generation", self.generation)  # raises BankRestarted, in the service's words
        return reply

    def fill(self, start: int, step: int, **fields) -> None:
        self._call("fill", start, step, as_numpy(fields), self.generation)

    def reset(self) -> None:
        self._call("reset", self.generation)

    def counts_from(self, step: int) -> None:
        self._call("counts_from", step, self.generation)

    def sample(self, n: int, extra: int = 0):
        return self.checked(self._call("sample", n, self.owner, extra))

    def push(self, lease_id: str, step: int, **fields) -> bool:
        return self._call("push", lease_id, step, as_numpy(fields))

    def stats(self) -> dict:
        return self._call("stats")

    def audit(self, last_step: int, global_batch: int) -> list[str]:
        return self._call("audit", last_step, global_batch, self.generation)

    def snapshot(self, step: int) -> str:
        return self._call("snapshot", step, self.generation)

    def restore(self, step: int | None = None) -> int | None:
        return self._call("restore", step, self.generation)


class LocalBankClient(BankClientBase):
    """The in-process bank used by ``run_in_process`` and tests; same calls as the Ray actor client."""

    def __init__(self, service: BankService, owner: str = "rank0"):
        self.service, self.owner = service, owner

    def _call(self, method: str, *args):
        return getattr(self.service, method)(*args)

    def checkout(self, n: int, step: int | None = None):
        return self.service.checkout(n, self.owner, step)

    def wait(self, handle):
        return self.checked(handle)

    def commit(self, lease_id: str, step: int, **fields) -> bool:
        return self.commit_async(lease_id, step, **fields)["ok"]

    def commit_async(self, lease_id: str, step: int, **fields) -> dict:
        return self.service.commit(lease_id, step, as_numpy(fields))
