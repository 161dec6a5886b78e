"""The divergence guard of the EBM stages: each step's energies, losses and gradient norms must be finite and the
energy gap and mean Langevin drift norm within ``guard.*`` bounds. A violation stops the attempt before anything
after it is checkpointed; the caller (``runner.run_in_process``, ``distributed.driver.fit_stage``) rolls back to
the last checkpoint (weights, optimisers, schedules, EMA and the bank / replay-buffer snapshot of that step: the
normal resume path), multiplies the stage's Langevin step sizes and / or learning rates by ``guard.backoff`` and
goes on; after ``guard.max_rollbacks`` it stops with ``GuardStop`` naming the step, the metric and its value.

The rollbacks are kept in ``<run>/<stage>/guard.json`` (so a resumed run keeps its backed-off settings), in each
checkpoint's metadata (``guard``) and in TensorBoard (``Guard/rollbacks``, ``Guard/scale``).

The per-step check does not read the metrics on the host: each step's flags stay on the device, and one small
all-gather before every report (so no checkpoint follows an unseen violation), and every ``guard.check_every``
steps if set, tells every rank whether any rank saw one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import Config
from ..core.ranks import gather_across_ranks
from ..io import storage
from ..stages import stage_class

# What must be finite: metrics whose names start with one of these.
FINITE = ("Loss/", "Energy/data", "Energy/sample", "Opt/grad_norm")
# Which metrics are bounded by which guard key (a bound of 0 = unchecked).
BOUNDED = {"Energy/abs_gap": "max_energy_gap", "Langevin/drift_norm": "max_drift_norm"}

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

    def describe(self) -> str:
        return f"step {self.step + 1}: {self.metric} = {self.value:.4g} ({self.rule})"


class StepGuard:
    """Checks each step's metrics on the device; ``poll`` reads the verdict (every rank gets the same)."""

    def __init__(self, cfg: Config, device: torch.device, rollbacks: int = 0):
        g = cfg.guard
        self.cfg, self.check_every, self.device, self.rollbacks = cfg, g.check_every, device, rollbacks
        # fp16's GradScaler skips steps whose gradients overflow: an infinite grad norm there is not a divergence
        self.finite = tuple(p for p in FINITE if not (p == "Opt/grad_norm" and cfg.compute.precision == "fp16"))
        self.bounds = {m: (key, float(getattr(g, key))) for m, key in BOUNDED.items() if getattr(g, key) > 0}
        self.names: list[str] = []  # the guarded metrics seen, in order (the same on every rank: the same code)
        self.layouts: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # bounds, indices per key set
        # (flag, step, metric index, value) of the first violation since the last poll, on the device
        self.first = torch.zeros(4, device=device)

    def rule_of(self, metric: str) -> str:
        if metric in self.bounds:
            key, bound = self.bounds[metric]
            return f"not finite, or above guard.{key} = {bound:g}"
        return "not finite"

    def observe(self, step: int, metrics: dict) -> None:
        """Flag this step's violations, if it is the first to have any since the last poll. Nothing is read on
        the host and nothing copied from it: the per-key-set bounds and indices are built once (a host-to-device
        copy would wait for the device)."""
        keys = tuple(k for k in metrics if k.startswith(self.finite) or k in self.bounds)
        if not keys:
            return
        if keys not in self.layouts:
            for k in keys:
                if k not in self.names:
                    self.names.append(k)
            bounds = [self.bounds.get(k, (None, math.inf))[1] for k in keys]
            index = [float(self.names.index(k)) for k in keys]
            self.layouts[keys] = (torch.tensor(bounds, device=self.device), torch.tensor(index, device=self.device))
        bounds, index = self.layouts[keys]
        values = torch.stack([self._scalar(metrics[k]) for k in keys])
        bad = ~torch.isfinite(values) | (values.abs() > bounds)
        at = bad.to(torch.uint8).argmax()  # the first flagged metric (0 when none)
        this = torch.stack([bad.any().float(), torch.full((), float(step), device=self.device), index[at], values[at]])
        self.first = torch.where(self.first[0] > 0, self.first, this)

    def _scalar(self, v) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.detach().reshape(()).float()
        return torch.full((), float(v), device=self.device)  # a fill, not a copy from the host

    def poll(self) -> Divergence | None:
        """The first violation since the last poll on any rank (one all-gather and host read), else None."""
        seen = gather_across_ranks(self.first.unsqueeze(0)).cpu()
        self.first = torch.zeros(4, device=self.device)
        flagged = seen[seen[:, 0] > 0]
        if not len(flagged):
            return None
        _, step, index, value = flagged[flagged[:, 1].argmin()].tolist()
        metric = self.names[int(index)]
        return Divergence(int(step), metric, value, self.rule_of(metric))

    def due(self, done: int) -> bool:
        """Whether to read the flags after step ``done`` besides at every report tick (``guard.check_every``)."""
        return self.check_every > 0 and done % self.check_every == 0

    @contextmanager
    def testing_hook(self, stage, step: int):
        """``guard.inject_nan_at_step``: H's energies are NaN during that step of the first attempt (no rollback
        yet), on every rank: a divergence the tests can place. The training forward is wrapped for the step (outside
        DDP, autocast and compiled modules, whatever they return: energies, or energies and logits)."""
        at = self.cfg.guard.inject_nan_at_step
        trainer = getattr(stage, "energy", None)
        if not (at and step + 1 == at and self.rollbacks == 0 and trainer is not None):
            yield
            return
        forward = trainer.ddp
        trainer.ddp = NaNEnergies(forward)
        try:
            yield
        finally:
            trainer.ddp = forward


class NaNEnergies:
    """A forward whose energies (the first output) come out NaN: the guard's injected divergence."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")


def step_guard(cfg: Config, stage: str, device: torch.device, rollbacks: int) -> StepGuard | None:
    """The guard of ``stage``'s loop, None where there is none (off, or a stage that declares no back-off)."""
    return StepGuard(cfg, device, rollbacks) if cfg.guard.enabled and stage_class(stage).backoff else None


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
            raise GuardStop(
                f"the guard log '{location}' is not JSON with a 'rollbacks' list: fix or remove it"
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
            {"step": div.step + 1, "metric": div.metric, "value": value, "rule": div.rule, "to": rolled_back_to}
        )
        keys = ", ".join(backed_off_keys(cfg, stage))
        return (
            f"[guard] {stage} diverged at {div.describe()}: rolling back to step {rolled_back_to}, {keys} x "
            f"{self.scale:g} (rollback {len(self.rollbacks)} of at most {g.max_rollbacks})"
        )


def write_divergence(stage_dir: str, div: Divergence) -> None:
    """Rank 0, when an attempt stops: what it saw, for the rollback (``take_divergence``)."""
    storage.write_text(f"{stage_dir}/{DIVERGENCE_FILE}", json.dumps(dataclasses.asdict(div)))


def take_divergence(stage_dir: str) -> Divergence | None:
    """The divergence an attempt of the stage stopped on and nobody has rolled back yet (removed), else None."""
    location = f"{stage_dir}/{DIVERGENCE_FILE}"
    if not storage.exists(location):
        return None
    div = Divergence(**json.loads(storage.read_text(location)))
    fs, path = storage.fs_and_path(location)
    fs.delete_file(path)
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
