"""Population-based training (Ray Tune's PBT) over one stage, on the Train V2 driver-function pattern.

Tune's PBT clones a better trial into a worse one by handing over the checkpoint the better trial last passed to
``tune.report``; Train V2's ``TuneReportCallback`` forwards metrics only, so PBT would never find one. Each PBT
trial therefore trains its stage in **chunks** of ``interval`` steps, each chunk its own TorchTrainer run
(``<trial run>/<stage>-to-<step>-<id>/``, a fresh Train run name so that Train never picks up another chunk's
checkpoints by itself), and after every chunk reports to Tune:

- the metrics of the chunk's last report and ``pbt_step``, PBT's clock (the step; 0 on the last report, so that
  a finished trial is never cloned into), and
- a Tune checkpoint holding the chunk's final Train checkpoint, the bank / replay-buffer snapshot of that step
  and ``origin.json`` (which trial, which step, which parameters).

When a trial (re)starts, ``tune.get_checkpoint()`` is its own latest checkpoint (after a pause or a failure) or
the donor's (after an exploit, with Tune's mutated parameters in the trial's config). The next chunk starts from a
copy of it: the Train checkpoint in ``<trial run>/<stage>-adopted/``, the snapshot in the new chunk's ``bank/``;
the weights, Adam state, EMA and bank / buffer continue where the donor stopped, under the trial's own step sizes
and learning rates (``load_adam_with_schedule`` keeps the LR a stage was built with). ``<trial run>/<stage>/
pbt_history.jsonl`` lists every start: from whom, at which step, with which parameters.

PBT runs synchronously (every trial reaches the same step before any is cloned), so an exploit always finds its
donor's checkpoint. The metric must be one the stage reports itself at a checkpoint (e.g. ``Eval/toy2d_quality``):
the eval pool's ``Eval/fid`` arrives later than the chunk ends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

from ..bank.store import snapshot_location, snapshot_name
from ..config import Config, ConfigError, from_dict
from ..evaluation.results import append_jsonl
from ..io import storage
from ..io.checkpoint import incomplete, load_meta
from ..io.software import software_fingerprint
from ..io.storage import local_dir, run_dir
from ..stages import stage_class
from ..training.session import Chunk
from .search_space import SearchSpace, trial_config

ORIGIN_FILE = "origin.json"
PBT_CLOCK = "pbt_step"  # the time attribute PBT perturbs on (see ``pbt_trial``)
BANK_SUBDIR = "bank"  # in a Tune checkpoint: the bank / replay-buffer snapshot of its step


def check_pbt(space: SearchSpace, search: str) -> None:
    """What PBT cannot run with, refused before anything starts: a searcher (PBT changes the trials' configs
    behind its back), or a metric the stage does not report at its checkpoints."""
    if search != "random":
        raise ConfigError(f"--scheduler pbt explores by itself; it takes --search random, not {search}")
    if space.metric.startswith("Eval/fid"):
        raise ConfigError(
            f"tune space '{space.source}': metric {space.metric} comes from the eval pool after a checkpoint, "
            "later than PBT compares trials; use a metric the stage reports itself (e.g. Eval/toy2d_quality), "
            "or another scheduler"
        )


def pbt_scheduler(space: SearchSpace, interval_steps: int, quantile_fraction: float, resample_probability: float):
    """Synchronous PBT over the space's keys; every explored value is clipped to the space's range (the config would
    refuse a value outside the ranges the space was checked against)."""
    from .pbt_scheduler import SynchronousPBT  # Ray Tune: kept off the CLI's start-up (this module checks spaces)

    mutations, bounds = {}, {}
    for p in space.params:
        if p.kind in ("grid", "choice"):
            mutations[p.key] = list(p.args)  # PBT moves to a neighbouring value (or resamples)
        else:
            mutations[p.key] = p.to_tune()
            bounds[p.key] = (p.args[0], p.args[1] - 1) if p.kind == "randint" else tuple(p.args)

    def clip(config: dict) -> dict:
        for key, (lo, hi) in bounds.items():
            config[key] = type(config[key])(min(max(config[key], lo), hi))
        return config

    return SynchronousPBT(
        time_attr=PBT_CLOCK,
        perturbation_interval=interval_steps,
        hyperparam_mutations=mutations,
        quantile_fraction=quantile_fraction,
        resample_probability=resample_probability,
        custom_explore_fn=clip,
        synch=True,
    )


def chunk_ends(start: int, total: int, interval: int) -> list[int]:
    """The steps at which the chunks after ``start`` end: every multiple of ``interval``, and ``total``."""
    ends = list(range((start // interval + 1) * interval, total, interval))
    return [e for e in ends if e > start] + ([total] if total > start else [])


def make_pbt_trainable(base: Config, stage: str, init_from: str | None, sweep_location: str, interval: int):
    base_tree = base.to_dict()
    software = software_fingerprint()  # the CLI's: a trial's driver runs on whichever node Tune placed it

    def pbt_trial(params: dict) -> None:
        from ray import tune

        from .driver import fit_stage

        trial_id = tune.get_context().get_trial_id()
        cfg = trial_config(from_dict(base_tree), params, sweep_location, trial_id)
        resume, step = None, 0
        if (given := tune.get_checkpoint()) is not None:
            resume, step = adopt(cfg, stage, given, trial_id, params)
        total = stage_class(stage).length(cfg)
        for end in chunk_ends(step, total, interval):
            name = f"{stage}-to-{end:08d}-{uuid.uuid4().hex[:6]}"
            if resume is not None:  # the bank actor of the chunk restores from the chunk's own bank/ folder
                prune(cfg, stage, keep=resume)
                carry_snapshot(resume, step, f"{run_dir(cfg)}/{name}")
            out = fit_stage(cfg, stage, init_from, chunk=Chunk(name, resume, end), software=software)
            resume, meta = out.checkpoint, load_meta(out.checkpoint)
            step = int(meta["step"])
            # PBT's clock: the step, but 0 at the end, so that no trial is cloned into or paused after it finished
            # (it would end with another trial's weights, untrained), also after a restored sweep forgot when PBT
            # last perturbed
            clock = step if step < total else 0
            with tune_checkpoint(cfg, stage, resume, step, trial_id, params) as ckpt:
                tune.report({**meta["metrics"], "step": step, PBT_CLOCK: clock}, checkpoint=ckpt)

    return pbt_trial


KEEP_OLDER = 3  # chunk runs / adopted copies a trial keeps besides the one it resumes from


def prune(cfg: Config, stage: str, keep: str) -> None:
    """Delete a trial's older chunk runs and adopted copies: all but the newest ``KEEP_OLDER`` and the one holding
    ``keep`` (under synchronous PBT every chunk leaves a Train run and an adopted copy, each a checkpoint and a bank
    snapshot, which would otherwise pile up)."""
    run = run_dir(cfg)
    chunks = [d for d, _ in storage.list_dirs(run) if d.rsplit("/", 1)[-1].startswith(f"{stage}-to-")]
    adopted = [d for d, _ in storage.list_dirs(f"{run}/{stage}-adopted")]  # a copy per folder: checkpoint, bank/
    # by the step in the name (<stage>-to-<step>-<id>, <step>-<id>): object stores keep no folder times
    older = sorted((d for d in chunks + adopted if not keep.startswith(d + "/")), key=folder_step)
    for d in older[: max(0, len(older) - KEEP_OLDER)]:
        storage.remove_tree(d)


def folder_step(folder: str) -> int:
    """The step a chunk run (``<stage>-to-<step>-<id>``) or an adopted copy (``<step>-<id>``) is named after."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    digits = name.split("-to-", 1)[-1].split("-", 1)[0]
    return int(digits) if digits.isdigit() else -1


def carry_snapshot(checkpoint: str, step: int, train_run: str) -> None:
    """Copy the bank snapshot beside ``checkpoint`` (of ``step``) into the Train run ``train_run``'s bank folder."""
    source = snapshot_location(checkpoint, step)
    if storage.exists(source):
        storage.copy_file(source, f"{train_run}/bank/{snapshot_name(step)}")


class tune_checkpoint:
    """A temporary ``tune.Checkpoint`` (Tune copies it into the trial's directory) of a chunk's end: the Train
    checkpoint's files, the bank snapshot of its step (if the stage has one) and ``origin.json``."""

    def __init__(self, cfg: Config, stage: str, train_checkpoint: str, step: int, trial_id: str, params: dict):
        self.args = (cfg, stage, train_checkpoint, step, trial_id, params)

    def __enter__(self):
        from ray import tune

        cfg, stage, train_checkpoint, step, trial_id, params = self.args
        self.tmp = Path(tempfile.mkdtemp(prefix="hdebm-pbt-"))
        with local_dir(train_checkpoint) as d:
            shutil.copytree(d, self.tmp, dirs_exist_ok=True)
        snapshot = snapshot_location(train_checkpoint, step)
        if storage.exists(snapshot):
            storage.copy_file(snapshot, self.tmp / BANK_SUBDIR / snapshot_name(step))
        origin = {"trial": trial_id, "step": step, "params": params, "stage": stage, "checkpoint": train_checkpoint}
        (self.tmp / ORIGIN_FILE).write_text(json.dumps(origin, indent=2))
        return tune.Checkpoint.from_directory(str(self.tmp))

    def __exit__(self, *exc):
        shutil.rmtree(self.tmp, ignore_errors=True)


def adopt(cfg: Config, stage: str, given, trial_id: str, params: dict) -> tuple[str, int]:
    """Copy a Tune checkpoint (the trial's own, or its donor's) into the trial's run: the Train checkpoint to
    ``<run>/<stage>-adopted/<step>-<id>/checkpoint_<step>``, its bank snapshot beside it; record the start in
    ``pbt_history.jsonl``. Returns (the copy's path, its step). The trial's own Train checkpoint, if it is still
    there and complete, is used as it is."""
    run = run_dir(cfg)
    with given.as_directory() as d:
        d = Path(d)
        origin = json.loads((d / ORIGIN_FILE).read_text())
        step = int(origin["step"])
        own = origin["trial"] == trial_id and origin.get("checkpoint") and incomplete(origin["checkpoint"]) is None
        if own:
            target = origin["checkpoint"]
        else:
            target = f"{run}/{stage}-adopted/{step:08d}-{uuid.uuid4().hex[:8]}/checkpoint_{step:08d}"  # bank/ beside
            with tempfile.TemporaryDirectory(prefix="hdebm-adopt-") as tmp:
                files = Path(tmp) / "checkpoint"
                shutil.copytree(d, files, ignore=shutil.ignore_patterns(ORIGIN_FILE, BANK_SUBDIR))
                storage.upload(files, target)
            if (d / BANK_SUBDIR / snapshot_name(step)).is_file():
                storage.copy_file(d / BANK_SUBDIR / snapshot_name(step), snapshot_location(target, step))
    entry = {"trial": trial_id, "from_trial": origin["trial"], "step": step, "params": params}
    entry["from_params"] = origin["params"]
    append_jsonl(f"{run}/{stage}/pbt_history.jsonl", entry)
    how = "continues" if origin["trial"] == trial_id else f"takes over trial {origin['trial']}'s state"
    print(f"[pbt] trial {trial_id} {how} at step {step} with {params}", flush=True)
    return target, step
