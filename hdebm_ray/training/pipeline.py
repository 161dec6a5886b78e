"""HDEBM's pipeline: its stages in order, each from the previous one's final checkpoint, kept in
``<run>/pipeline.json`` so that a re-run skips the finished stages and resumes the rest.

The pipeline does not know where stages run: ``run_pipeline`` takes the fit function (``runner.fit_in_process`` in
this process; the Ray driver's ``fit_stage`` on a cluster) and, optionally, what to do with a finished stage's
checkpoint (the driver writes a sample grid).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..config import Config, ConfigError
from ..io import storage
from ..io.checkpoint import load_meta
from ..io.storage import run_dir
from ..stages import PIPELINE, stage_class
from .session import StageResult

STATE_FILE = "pipeline.json"

FitFn = Callable[[Config, str, "str | None"], StageResult]


def read_state(run_location: str) -> dict:
    """``<run>/pipeline.json``: each finished stage's checkpoint, step, summary and sample grid ({} if none)."""
    path = f"{run_location}/{STATE_FILE}"
    if not storage.exists(path):
        return {}
    fix = "move it aside: each stage then resumes from its own newest checkpoint (a finished one ends at once)"
    return storage.read_json(path, "the pipeline record", fix)


def write_state(run_location: str, state: dict) -> None:
    storage.write_text(f"{run_location}/{STATE_FILE}", json.dumps(state, indent=2))


def finished(entry: dict | None) -> bool:
    """Whether a pipeline entry names a checkpoint that exists and ends its stage."""
    if not entry:
        return False
    try:
        return bool(load_meta(entry["checkpoint"]).get("done"))
    except FileNotFoundError:
        return False


def init_checkpoint(cfg: Config, stage: str, state: dict | None = None) -> str | None:
    """The checkpoint ``stage`` starts from in this run: the final one of the stage it ``starts_from`` (None for a
    stage that starts from nothing); ConfigError, naming what to do, when that stage has not finished."""
    parent = stage_class(stage).starts_from
    if parent is None:
        return None
    state = read_state(run_dir(cfg)) if state is None else state
    if not finished(state.get(parent)):
        raise ConfigError(
            f"stage {stage!r} starts from a {parent!r} checkpoint: pass --init-from DIR or run the {parent!r} stage "
            f"of run {cfg.run.name!r} first"
        )
    return state[parent]["checkpoint"]


def check_stages(stages: list[str]) -> None:
    unknown = [s for s in stages if s not in PIPELINE]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; stages are {', '.join(PIPELINE)}")


def run_pipeline(
    cfg: Config,
    fit: FitFn,
    stages: list[str] | None = None,
    after_stage: Callable[[str, StageResult], dict] | None = None,
) -> dict:
    """Run ``stages`` (default: the whole pipeline) in order with ``fit(cfg, stage, init_from)``, each from the
    previous stage's final checkpoint, skipping the finished ones; ``after_stage(stage, result)`` returns more to
    keep in the stage's entry (e.g. its sample grid). Returns the pipeline state."""
    location = run_dir(cfg)
    stages = list(stages or PIPELINE)
    check_stages(stages)
    state = read_state(location)
    for stage in stages:
        if finished(state.get(stage)):
            print(f"[pipeline] {stage}: already finished at {state[stage]['checkpoint']}", flush=True)
            continue
        init_from = init_checkpoint(cfg, stage, state)
        print(f"[pipeline] {stage}: starting" + (f" from {init_from}" if init_from else ""), flush=True)
        result = fit(cfg, stage, init_from)
        state[stage] = {"checkpoint": result.checkpoint, "step": result.step, "summary": result.summary}
        if after_stage is not None:
            state[stage].update(after_stage(stage, result))
        write_state(location, state)
        print(f"[pipeline] {stage}: done -> {result.checkpoint}", flush=True)
    return state
