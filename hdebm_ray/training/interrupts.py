"""Stopping a stage without losing it: a preemption notice (a node drained with a deadline) or a stop request
(SIGTERM to the driver) makes every rank checkpoint at the current step.

Every ``run.interrupt_check_every`` steps each rank asks its port (``session.StagePort.interruption``) whether to
stop: a check every rank makes at the same step, so they agree. On a **preemption** the stage checkpoints (weights,
optimisers, the bank or buffer snapshot) and waits: Ray Train restarts the group once the node has gone or at the
notice's deadline plus ``ray.preemption_grace_s`` (a drained node takes no new workers), charging the preemption
budget, and the restart resumes from exactly that step. On
a **stop** the stage checkpoints and ends; the driver reports ``RunStopped`` and the same command resumes the run.

The stop request is a file in the run's folder (``stop.json``), written by the driver's SIGTERM handler, so that
every worker on every node sees it through the storage they already share; the driver removes a stale one when it
starts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

from ..core.ranks import status
from ..io import storage

STOP_FILE = "stop.json"


@dataclass(frozen=True)
class Interruption:
    """A reason to checkpoint at the current step: ``preemption`` (the node goes at ``deadline_s``, UNIX seconds;
    None: no deadline given) or ``stop``."""

    kind: str
    reason: str
    deadline_s: float | None = None


@dataclass(frozen=True)
class Stopped:
    """How an attempt ended on a stop request: the step it checkpointed at."""

    step: int
    reason: str


class RunStopped(RuntimeError):
    """The run stopped on request after checkpointing: one line saying where, and that the same command resumes."""


# How long past the controller's own limit (the deadline plus ray.preemption_grace_s) a rank that checkpointed for
# a preemption still waits: Ray Train restarts the group at that limit, and a rank must not train steps meanwhile
# that the restart would throw away.
HOLD_MARGIN_S = 60.0
NO_DEADLINE_S = 120.0  # Ray Train 2.60's DEFAULT_PREEMPTION_DEADLINE_S


def hold_for(interruption: Interruption, grace_s: float, chief: bool, poll_s: float = 0.5) -> None:
    """After a preemption checkpoint: wait for Ray Train to restart the group (at the notice's deadline plus
    ``grace_s``, or when the node goes); if nothing has happened ``HOLD_MARGIN_S`` after that, go on training."""
    # a notice without a deadline: Ray Train gives the node NO_DEADLINE_S from when it saw it
    until = (interruption.deadline_s or time.time() + NO_DEADLINE_S) + grace_s + HOLD_MARGIN_S
    if chief:
        status(f"[preemption] {interruption.reason}: checkpointed; waiting up to {max(0.0, until - time.time()):.0f} s")
    while time.time() < until:
        time.sleep(min(poll_s, max(0.0, until - time.time())))
    if chief:
        status("[preemption] the node is still here after its deadline: training on")


class StopRequest:
    """The driver's side of a stop: a SIGTERM handler that writes ``<run>/stop.json`` (once; a second SIGTERM ends
    the process at once) and remembers it; ``pending`` tells the driver after its stage returns."""

    def __init__(self, run_location: str):
        self.path = f"{run_location}/{STOP_FILE}"
        self.reason: str | None = None
        self.previous = None

    def clear_stale(self) -> None:
        """Remove a request a previous driver left (this driver owns the run now)."""
        storage.remove_file(self.path)

    def request(self, reason: str) -> None:
        self.reason = reason
        storage.write_text(self.path, json.dumps({"reason": reason, "at": time.time(), "pid": os.getpid()}))

    @property
    def pending(self) -> bool:
        return self.reason is not None

    def _on_signal(self, signum, frame) -> None:
        if self.reason is not None:  # a second one: stop now, the checkpoint may not have landed
            raise SystemExit(128 + signum)
        print(
            f"[run] {signal.Signals(signum).name}: every stage rank checkpoints at its next check "
            "(run.interrupt_check_every steps) and the run stops; the same command resumes it",
            flush=True,
        )
        self.request(f"{signal.Signals(signum).name} to the driver (pid {os.getpid()})")

    def __enter__(self) -> StopRequest:
        self.clear_stale()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if self.pending:
            storage.remove_file(self.path)


def stop_requested(stop_file: str | None) -> str | None:
    """The reason in a stop request file, None when there is none."""
    if not stop_file or not storage.exists(stop_file):
        return None
    try:
        return json.loads(storage.read_text(stop_file)).get("reason") or "a stop request"
    except (ValueError, OSError):
        return "a stop request"
