"""Tune search spaces as YAML over the CLI's dotted config keys, checked before any trial starts.

A space file (see ``tune_spaces/``)::

    stage: stage1                   # which stage each trial trains
    metric: Eval/toy2d_quality      # a key of the stage's reports (Eval/fid: needs eval actors)
    mode: max
    params:
      stage1.langevin.step_size: {loguniform: [1.0e-3, 2.0e-2]}
      stage1.langevin.steps: {choice: [10, 20, 40]}
      stage1.lr_energy: {grid: [1.0e-4, 1.0e-3]}

Distributions: ``loguniform: [lo, hi]`` (0 < lo < hi), ``uniform: [lo, hi]``, ``randint: [lo, hi]`` (integers,
``hi`` excluded, as in Ray Tune), ``choice: [values]`` and ``grid: [values]`` (every value, each combined with
``--samples`` draws of the others). Every key must be a config key, and every value the distribution can produce
(both ends of a range, each listed value) must pass the config's own range checks.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, key_type, yaml_problem
from ..stages import STAGES, reported_metrics
from ..stages.reported import EVAL

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
TOP_LEVEL = {"stage", "metric", "mode", "params", "description"}


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    args: tuple

    def extremes(self) -> list[Any]:
        """Values the config must accept: the ends of a range, or every listed value."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def to_tune(self):
        from ray import tune

        lo_hi = self.args
        return {
            "loguniform": lambda: tune.loguniform(*lo_hi),
            "uniform": lambda: tune.uniform(*lo_hi),
            "randint": lambda: tune.randint(*lo_hi),
            "choice": lambda: tune.choice(list(lo_hi)),
            "grid": lambda: tune.grid_search(list(lo_hi)),
        }[self.kind]()


@dataclass(frozen=True)
class SearchSpace:
    stage: str
    metric: str
    mode: str
    params: tuple[Param, ...]
    source: str

    def param_space(self) -> dict:
        """Ray Tune's ``param_space``: flat dotted keys, so trial configs name the keys the CLI uses."""
        return {p.key: p.to_tune() for p in self.params}


def _fail(source: str, where: str, message: str):
    raise ConfigError(f"tune space '{source}': {where}: {message}")


def _param(source: str, key: str, spec: Any) -> Param:
    where = f"params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        _fail(source, where, f"expected one of {{{', '.join(DISTRIBUTIONS)}}}: ..., got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        _fail(source, where, f"unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        _fail(source, where, f"{kind} needs a non-empty list, got {args!r}")
    if kind in ("loguniform", "uniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            _fail(source, where, f"{kind} needs [lower, upper] numbers, got {args!r}")
        lo, hi = args
        if not lo < hi:
            _fail(source, where, f"{kind} lower {lo!r} must be below upper {hi!r}")
        if kind == "loguniform" and lo <= 0:
            _fail(source, where, f"loguniform needs lower > 0, got {lo!r}")
        if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
            _fail(source, where, f"randint needs integers, got {args!r}")
    return Param(key, kind, tuple(args))


def parse_space(text: str, source: str, base: Config, metric: str | None = None) -> SearchSpace:
    """Parse and check a space against ``base`` (the resolved preset/config the trials start from); ``metric``
    (``--metric``) replaces the file's before it is checked."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        _fail(source, "YAML", yaml_problem(err))
    if not isinstance(tree, dict):
        _fail(source, "top level", "expected a mapping with stage, metric, mode, params")
    unknown = sorted(set(tree) - TOP_LEVEL)
    if unknown:
        _fail(source, unknown[0], f"unknown key; expected {', '.join(sorted(TOP_LEVEL))}")
    for key in ("stage", "metric", "params"):
        if key not in tree:
            _fail(source, key, "missing")
    if tree["stage"] not in STAGES:
        _fail(source, "stage", f"unknown stage {tree['stage']!r}; stages: {', '.join(STAGES)}")
    mode = tree.get("mode", "max")
    if mode not in ("min", "max"):
        _fail(source, "mode", f"must be 'min' or 'max', got {mode!r}")
    if not isinstance(tree["params"], dict) or not tree["params"]:
        _fail(source, "params", "expected a non-empty mapping of dotted config keys to distributions")
    params = tuple(_param(source, str(k), v) for k, v in tree["params"].items())
    for p in params:
        _check_kind(source, p)
        for value in p.extremes():
            try:
                base.replace(**{p.key: value})
            except ConfigError as err:
                _fail(source, f"params.{p.key}", f"value {value!r} is not a valid config value: {err}")
    _check_corners(source, params, base)
    space = SearchSpace(tree["stage"], metric or str(tree["metric"]), mode, params, source)
    check_metric(space, "--metric" if metric else "metric", base)
    return space


def check_metric(space: SearchSpace, where: str, base: Config) -> None:
    """The space's metric must be a key its stage reports (``where``: the space key or the flag that set it); an
    eval pool's metric needs eval actors that score the stage, or every trial would report NaN."""
    known = reported_metrics(space.stage)
    if space.metric not in known:
        close = difflib.get_close_matches(space.metric, sorted(known), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"it reports {', '.join(sorted(known)[:12])}, ..."
        _fail(space.source, where, f"stage {space.stage} does not report {space.metric!r}; {hint}")
    if space.metric in EVAL and (base.eval.actors == 0 or space.stage not in base.eval.stages):
        _fail(
            space.source,
            where,
            f"{space.metric} comes from eval actors scoring stage {space.stage}, and this config has "
            f"eval.actors={base.eval.actors}, eval.stages={list(base.eval.stages)}: --set eval.actors=1 and "
            f"include {space.stage} in eval.stages",
        )


def _check_kind(source: str, p: Param) -> None:
    """The distribution must produce the key's type: a float range on an integer key would hand trials 12.7."""
    try:
        typ = key_type(p.key)
    except ConfigError as err:
        _fail(source, f"params.{p.key}", str(err))
    name = getattr(typ, "__name__", str(typ))
    if p.kind in ("uniform", "loguniform") and typ is not float:
        hint = " (use randint or choice)" if typ is int else " (use choice)"
        _fail(source, f"params.{p.key}", f"{p.kind} draws real numbers but the key is {name}{hint}")
    if p.kind == "randint" and typ not in (int, float):
        _fail(source, f"params.{p.key}", f"randint draws integers but the key is {name} (use choice)")


MAX_CORNERS = 4096


def _check_corners(source: str, params: tuple[Param, ...], base: Config) -> None:
    """Rules across keys (bank >= batch, divisibility by the workers) checked at every combination of the ends
    of the ranges and the listed values (a seeded sample of MAX_CORNERS of them when there are more). A rule on
    the interior of a range (a power of two inside a randint range) is the trial's own config check."""

    ends = [p.extremes() for p in params]
    if math.prod(len(e) for e in ends) <= MAX_CORNERS:
        corners = itertools.product(*ends)
    else:
        rng = random.Random(0)
        corners = (tuple(rng.choice(e) for e in ends) for _ in range(MAX_CORNERS))
    for corner in corners:
        values = {p.key: v for p, v in zip(params, corner, strict=True)}
        try:
            base.replace(**values)
        except ConfigError as err:
            combo = ", ".join(f"{k}={v!r}" for k, v in values.items())
            _fail(source, "params", f"the combination {combo} is not a valid config: {err}")


def load_space(path: str | Path, base: Config, metric: str | None = None) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune space file '{path}' does not exist")
    return parse_space(path.read_text(), str(path), base, metric)


def trial_config(base: Config, params: dict, sweep_location: str, trial_id: str) -> Config:
    """A trial's config: the base, the sampled dotted keys, and its own run directory under the sweep."""
    return base.replace(**params, **{"run.name": f"trial-{trial_id}", "run.storage_path": f"{sweep_location}/trials"})
