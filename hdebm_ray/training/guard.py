"""The divergence guard of the EBM stages, its rollback bookkeeping (what each step must satisfy is checked on the
device by ``step_guard.py``). A violation stops the attempt before anything after it is checkpointed; the rollback
loop (``session.fit_with_rollbacks``) rolls back to the last checkpoint (weights, optimisers, schedules, EMA and the
bank / replay-buffer snapshot of that step: the normal resume path), multiplies the stage's Langevin step sizes and /
or learning rates by ``guard.backoff`` and goes on; after ``guard.max_rollbacks`` it stops with ``GuardStop`` naming
the step, the metric and its value.

The rollbacks are kept in ``<run>/<stage>/guard.json`` (so a resumed run keeps its backed-off settings), in each
checkpoint's metadata (``guard``) and in TensorBoard (``Guard/rollbacks``, ``Guard/scale``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..config import Config
from ..io import storage
from ..stages import stage_class

LOG_FILE = "guard.json"  # in the stage's directory: the rollbacks so far
DIVERGENCE_FILE = "divergence.json"  # written by rank 0 when an attempt stops; taken by whoever rolls back


class GuardStop(RuntimeError):
    """The stage diverged more than ``guard.max_rollbacks`` times: one line naming the step, metric and value."""


@dataclass(frozen=True)
class Divergence:
    """The first violation an attempt saw."""

    step: int  # the step (0-based) whose metrics broke the rule
    metric: str
    value: float
    rule: str  # "not finite", or "> <bound> (guard.<key>)"
    seen_after: int = 0  # the steps done when the guard's poll saw it (a report tick, or a guard.check_every step)

    def describe(self) -> str:
        return f"step {self.step + 1}: {self.metric} = {self.value:.4g} ({self.rule})"


# ----------------------------------------------------------------------------------------------------------------
# Rollback bookkeeping (driver / in-process runner)


@dataclass
class GuardLog:
    """The rollbacks of one stage of a run, oldest first; ``scale`` is what the backed-off keys are multiplied by."""

    rollbacks: list[dict]
    backoff: float

    @property
    def scale(self) -> float:
        return self.backoff ** len(self.rollbacks)

    def metrics(self) -> dict[str, float]:
        return {"Guard/rollbacks": float(len(self.rollbacks)), "Guard/scale": self.scale}

    def to_json(self) -> str:
        return json.dumps({"rollbacks": self.rollbacks, "scale": self.scale}, indent=2)

    @staticmethod
    def read(cfg: Config, stage_dir: str) -> GuardLog:
        """The stage's log (empty if it has none)."""
        location = f"{stage_dir}/{LOG_FILE}"
        if not storage.exists(location):
            return GuardLog([], cfg.guard.backoff)
        try:
            rollbacks = json.loads(storage.read_text(location))["rollbacks"]
            if not isinstance(rollbacks, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise storage.RunStateError(
                f"the guard log '{location}' is not JSON with a 'rollbacks' list: fix it, or remove it to resume with "
                "the stage's configured step sizes and learning rates and no rollbacks counted"
            ) from None
        return GuardLog(rollbacks, cfg.guard.backoff)

    def record(self, cfg: Config, stage: str, div: Divergence, rolled_back_to: int) -> str:
        """Count a rollback; returns the status line, or raises ``GuardStop`` past ``guard.max_rollbacks``."""
        g = cfg.guard
        if len(self.rollbacks) >= g.max_rollbacks:
            tried = f" after {len(self.rollbacks)} rollback(s)" if self.rollbacks else ""
            raise GuardStop(
                f"stage {stage} diverged at {div.describe()}{tried}; guard.max_rollbacks = {g.max_rollbacks} "
                f"reached. Lower the Langevin step size / learning rates, or raise guard.max_rollbacks"
            )
        value = div.value if math.isfinite(div.value) else str(div.value)  # JSON has no NaN / inf
        self.rollbacks.append(
            {
                "step": div.step + 1,
                "metric": div.metric,
                "value": value,
                "rule": div.rule,
                "seen_after": div.seen_after,
                "to": rolled_back_to,
            }
        )
        keys = ", ".join(backed_off_keys(cfg, stage))
        return (
            f"[guard] {stage} diverged at {div.describe()}: rolling back to step {rolled_back_to}, {keys} x "
            f"{self.scale:g} (rollback {len(self.rollbacks)} of at most {g.max_rollbacks})"
        )


def write_divergence(stage_dir: str, div: Divergence) -> None:
    """Rank 0, when an attempt stops: what it saw, for the rollback (``take_divergence``)."""
    storage.write_text(f"{stage_dir}/{DIVERGENCE_FILE}", json.dumps(dataclasses.asdict(div)))


def take_divergence(stage_dir: str, remove: bool = True) -> Divergence | None:
    """The divergence an attempt of the stage stopped on and nobody has rolled back yet (removed unless ``remove``
    is False: a dry run's check), else None."""
    location = f"{stage_dir}/{DIVERGENCE_FILE}"
    if not storage.exists(location):
        return None
    fix = "delete it: the stage then resumes from its newest checkpoint without a rollback"
    record = storage.read_json(location, "the divergence record", fix)
    try:
        div = Divergence(
            **{k: record[k] for k in ("step", "metric", "value", "rule")}, seen_after=record.get("seen_after", 0)
        )
    except KeyError as e:
        raise storage.RunStateError(f"the divergence record '{location}' has no {e}: {fix}") from None
    if remove:
        storage.remove_file(location)
    return div


def roll_back(cfg: Config, stage: str, stage_dir: str, log: GuardLog, div: Divergence, to_step: int) -> str:
    """Count the rollback to ``to_step`` in the log (written) and return its status line; ``GuardStop`` past
    ``guard.max_rollbacks``."""
    line = log.record(cfg, stage, div, to_step)
    storage.write_text(f"{stage_dir}/{LOG_FILE}", log.to_json())
    return line


def backed_off_keys(cfg: Config, stage: str) -> tuple[str, ...]:
    """The dotted keys a rollback of ``stage`` scales (its ``backoff``, by ``guard.backoff_applies_to``)."""
    backoff = stage_class(stage).backoff
    picked = {"both": backoff.step_sizes + backoff.lrs, "step_size": backoff.step_sizes, "lr": backoff.lrs}
    return tuple(f"{stage}.{key}" for key in picked[cfg.guard.backoff_applies_to])


def backed_off(cfg: Config, stage: str, log: GuardLog) -> Config:
    """``cfg`` with the stage's backed-off keys multiplied by the log's scale (``cfg`` itself without rollbacks)."""
    if not log.rollbacks or stage_class(stage).backoff is None:
        return cfg
    return cfg.scaled(backed_off_keys(cfg, stage), log.scale)
