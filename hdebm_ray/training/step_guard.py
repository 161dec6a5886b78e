"""The divergence guard's per-step check, on the device: what each step's metrics must satisfy, and the first
violation since the last poll (``guard.py`` rolls back and backs off).

The bounds a paper run can live with do not depend on the energy's scale, which nothing fixes (an energy net's
output can grow by orders of magnitude in a healthy run, and every drift and gap with it):

- **non-finite** losses, energies, gradient norms and chain states trip at once;
- the chain's **post-clip step** (``Langevin/step_rms``: its RMS per element, in data units) and the **chain ends'
  magnitude** (``Langevin/sample_abs_max``, data units) are bounded: an exploding chain leaves the data's range
  whatever H's scale;
- the **energy gap relative to its own running statistics** (``Energy/gap``'s distance from its running mean in
  running standard deviations, learned over ``guard.gap_warmup_steps`` steps of each attempt): a jump by orders of
  magnitude, not a drift;
- optionally the **clip fraction**, and the scale-dependent absolute bounds of earlier releases
  (``guard.max_energy_gap``, ``guard.max_drift_norm``, off by default);
- a bound (not a non-finite value) must be exceeded on ``guard.patience`` consecutive steps: one step proves
  nothing.

Nothing is read on the host per step: flags, streaks and running statistics stay on the device, and the poll at each
report tick (and every ``guard.check_every`` steps) is one small all-gather. ``guard.mode: observe`` records and
prints what it sees and never rolls back.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..config import Config
from ..core.ranks import gather_across_ranks, status
from .guard import Divergence

# What must be finite: metrics whose names start with one of these.
FINITE = ("Loss/", "Energy/data", "Energy/sample", "Opt/grad_norm", "Langevin/sample_abs_max")
# Which metrics are bounded (absolute value) by which guard key; a bound of 0 is unchecked.
BOUNDED = {
    "Langevin/step_rms": "max_step_rms",
    "Langevin/sample_abs_max": "max_sample_abs",
    "Langevin/clip_fraction": "max_clip_fraction",
    "Energy/abs_gap": "max_energy_gap",
    "Langevin/drift_norm": "max_drift_norm",
}
GAP = "Energy/gap"  # bounded relative to its running statistics (guard.max_gap_z)
GAP_DECAY = 0.98  # the running mean and variance of the gap: ~50 steps of memory


class StepGuard:
    """Checks each step's metrics on the device; ``poll`` reads the verdict (every rank gets the same)."""

    def __init__(self, cfg: Config, device: torch.device, rollbacks: int = 0, chief: bool = True):
        g = cfg.guard
        self.chief = chief
        self.cfg, self.check_every, self.device, self.rollbacks = cfg, g.check_every, device, rollbacks
        self.observe_only = g.mode == "observe"
        # fp16's GradScaler skips steps whose gradients overflow: an infinite grad norm there is not a divergence
        self.finite = tuple(p for p in FINITE if not (p == "Opt/grad_norm" and cfg.compute.precision == "fp16"))
        self.bounds = {m: (key, float(getattr(g, key))) for m, key in BOUNDED.items() if getattr(g, key) > 0}
        self.gap_z, self.warmup, self.patience = g.max_gap_z, g.gap_warmup_steps, g.patience
        self.names: list[str] = []  # the guarded metrics seen, in order (the same on every rank: the same code)
        self.layouts: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.streak: dict[tuple[str, ...], torch.Tensor] = {}  # consecutive steps over each bound, per key set
        zero = torch.zeros((), device=device)
        self.gap_mean, self.gap_var, self.gap_seen = zero.clone(), zero.clone(), 0
        # (flag, step, metric index, value) of the first violation since the last poll, on the device
        self.first = torch.zeros(4, device=device)
        self.violations = 0  # observe mode: polls that saw one

    def rule_of(self, metric: str) -> str:
        if metric in self.bounds:
            key, bound = self.bounds[metric]
            return f"not finite, or above guard.{key} = {bound:g} for {self.patience} step(s)"
        if metric == GAP:
            return f"more than guard.max_gap_z = {self.gap_z:g} running standard deviations from its running mean"
        return "not finite"

    def _layout(self, keys: tuple[str, ...]):
        if keys not in self.layouts:
            for k in keys:
                if k not in self.names:
                    self.names.append(k)
            bounds = [self.bounds.get(k, (None, math.inf))[1] for k in keys]
            index = [float(self.names.index(k)) for k in keys]
            finite = [k.startswith(self.finite) for k in keys]
            dev = self.device
            self.layouts[keys] = (
                torch.tensor(bounds, device=dev),
                torch.tensor(index, device=dev),
                torch.tensor(finite, device=dev),
            )
            self.streak[keys] = torch.zeros(len(keys), device=dev)
        return self.layouts[keys]

    def observe(self, step: int, metrics: dict) -> None:
        """Flag this step's violations, if it is the first to have any since the last poll. Nothing is read on the
        host and nothing copied from it: the per-key-set bounds and indices are built once."""
        keys = tuple(k for k in metrics if k.startswith(self.finite) or k in self.bounds or k == GAP)
        if not keys:
            return
        bounds, index, must_be_finite = self._layout(keys)
        values = torch.stack([self._scalar(metrics[k]) for k in keys])
        nonfinite = ~torch.isfinite(values) & must_be_finite
        over = values.abs() > bounds
        if GAP in keys and self.gap_z > 0:
            over = over | self._gap_outlier(values[keys.index(GAP)], keys.index(GAP), len(keys))
        streak = torch.where(over, self.streak[keys] + 1, torch.zeros_like(self.streak[keys]))
        self.streak[keys] = streak
        bad = nonfinite | (streak >= self.patience)
        at = bad.to(torch.uint8).argmax()  # the first flagged metric (0 when none)
        this = torch.stack([bad.any().float(), torch.full((), float(step), device=self.device), index[at], values[at]])
        self.first = torch.where(self.first[0] > 0, self.first, this)

    def _gap_outlier(self, gap: torch.Tensor, position: int, n: int) -> torch.Tensor:
        """Whether ``gap`` is an outlier of the running statistics (a one-hot mask at ``position``), then learn it.
        Outliers are not learned, so a divergence cannot move the statistics towards itself."""
        mask = torch.zeros(n, dtype=torch.bool, device=self.device)
        finite = torch.isfinite(gap)
        if self.gap_seen >= self.warmup:
            # the scale floor keeps a gap that has been exactly constant from making every change an outlier
            spread = self.gap_var.sqrt() + 1e-3 * self.gap_mean.abs() + 1e-12
            outlier = finite & ((gap - self.gap_mean).abs() > self.gap_z * spread)
            mask[position] = outlier
        else:
            outlier = torch.zeros((), dtype=torch.bool, device=self.device)
        learn = finite & ~outlier
        if self.gap_seen == 0:
            self.gap_mean = torch.where(learn, gap, self.gap_mean)
        else:
            delta = gap - self.gap_mean
            mean = self.gap_mean + (1 - GAP_DECAY) * delta
            var = GAP_DECAY * (self.gap_var + (1 - GAP_DECAY) * delta**2)
            self.gap_mean = torch.where(learn, mean, self.gap_mean)
            self.gap_var = torch.where(learn, var, self.gap_var)
        self.gap_seen += 1
        return mask

    def _scalar(self, v) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.detach().reshape(()).float()
        return torch.full((), float(v), device=self.device)  # a fill, not a copy from the host

    def poll(self) -> Divergence | None:
        """The first violation since the last poll on any rank (one all-gather and host read), else None; in observe
        mode it is counted and printed (rank 0) and None returned: training goes on."""
        seen = gather_across_ranks(self.first.unsqueeze(0)).cpu()
        self.first = torch.zeros(4, device=self.device)
        flagged = seen[seen[:, 0] > 0]
        if not len(flagged):
            return None
        _, step, index, value = flagged[flagged[:, 1].argmin()].tolist()
        metric = self.names[int(index)]
        divergence = Divergence(int(step), metric, value, self.rule_of(metric))
        if self.observe_only:
            self.violations += 1
            if self.chief:
                status(f"[guard] observed {divergence.describe()} (guard.mode: observe, no rollback)")
            return None
        return divergence

    def metrics(self) -> dict[str, float]:
        return {"Guard/observed_violations": float(self.violations)} if self.observe_only else {}

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


def step_guard(cfg: Config, stage_cls, device: torch.device, rollbacks: int, chief: bool = True) -> StepGuard | None:
    """The guard of a stage's loop, None where there is none (off, or a stage that declares no back-off)."""
    if not cfg.guard.enabled or stage_cls.backoff is None:
        return None
    return StepGuard(cfg, device, rollbacks, chief)
