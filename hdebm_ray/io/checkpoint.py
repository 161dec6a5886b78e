"""Checkpoints as plain directories: one ``<name>.pt`` state_dict per component, ``config.yaml`` and ``meta.json``.

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint never holds pickled objects, so loading
one cannot run code, and it stays readable without this package's classes. ``meta.json`` is written last and
lists every state file's size (``files``): a directory without it, or whose files differ from it, is incomplete
and never loaded (``CheckpointError``), nor evaluated.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from ..config import Config, parse_config
from . import storage
from .storage import as_uri, fs_and_path

META_FILE, CONFIG_FILE = "meta.json", "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, corrupt, or holding pickled objects."""


def save_checkpoint(directory: str | Path, states: dict[str, dict], config: Config, meta: dict[str, Any]) -> Path:
    """Write the checkpoint; ``meta.json`` last (with the state files' sizes), so that its presence means the
    rest is complete. The in-process runner writes into a temporary directory and renames it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        torch.save(state, out / f"{name}.pt")
    (out / CONFIG_FILE).write_text(config.to_yaml())
    files = {f"{name}.pt": (out / f"{name}.pt").stat().st_size for name in states}
    (out / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2, sort_keys=True))
    return out


def incomplete(directory: str | Path) -> str | None:
    """Why the checkpoint at ``directory`` (path or URI) is incomplete, None if it is complete: its meta.json
    is missing or unreadable, or a state file it lists is missing or of another size."""
    try:
        meta = load_meta(directory)
    except FileNotFoundError:
        return f"it has no {META_FILE}"
    except CheckpointError:
        return f"its {META_FILE} cannot be read"
    except OSError as e:
        return f"its {META_FILE} cannot be read ({e})"
    fs, base = storage.fs_and_path(str(directory))
    for name, size in (meta.get("files") or {}).items():
        info = fs.get_file_info(f"{base}/{name}")
        if not info.is_file:
            return f"{name} is missing"
        if info.size != size:
            return f"{name} has {info.size} bytes, {META_FILE} says {size}"
    return None


def load_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json; ``directory`` may be a local path or a storage URI (s3://, gs://, file://)."""
    path = f"{directory}/{META_FILE}"
    if not storage.exists(path):
        raise FileNotFoundError(f"'{directory}' is not a checkpoint directory (no {META_FILE})")
    try:
        meta = json.loads(storage.read_text(path))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint '{directory}' has an unreadable {META_FILE} ({str(e).splitlines()[0]}): move the checkpoint "
            "aside to resume from the one before it"
        ) from None
    return meta


def load_config_of(directory: str | Path) -> Config:
    """The config a checkpoint was written with (a local path or a URI); renamed keys of older releases are read."""
    location = f"{directory}/{CONFIG_FILE}"
    return parse_config(storage.read_text(location), f"config file '{location}'")


# Component names of checkpoints written before hdebm-ray 0.2 (the diffusion and distillation stages' optimiser
# parts), read under the names every trained network's parts now have (``core.optim.TrainedModule``).
LEGACY_NAMES = {"optimizer": "denoiser_opt", "lr_sched": "denoiser_sched", "scaler": "denoiser_scaler"}


def state_files(directory: str | Path) -> dict[str, Path]:
    """{component name: its file} of a checkpoint, legacy names read as their current ones."""
    files = {p.stem: p for p in sorted(Path(directory).glob("*.pt"))}
    for old, new in LEGACY_NAMES.items():
        if old in files and new not in files:
            files[new] = files.pop(old)
    return files


def load_states(directory: str | Path, names: list[str] | None = None, map_location="cpu") -> dict[str, dict]:
    """The named (default: all) state_dicts of a checkpoint, loaded with ``weights_only=True``."""
    d = Path(directory)
    files = state_files(d)
    names = names if names is not None else list(files)
    missing = [n for n in names if n not in files]
    if missing:
        raise FileNotFoundError(
            f"checkpoint '{d}' has no {missing[0]}.pt (has {sorted(p.name for p in d.glob('*.pt'))})"
        )
    if (d / META_FILE).is_file() and (why := incomplete(d)) is not None:
        raise CheckpointError(f"checkpoint '{d}' is incomplete: {why}")
    return {n: load_state_file(files[n], map_location) for n in names}


def ema_weights(directory: str | Path, names: list[str], map_location="cpu") -> dict[str, dict] | None:
    """The EMA weights of the named components as plain state_dicts (an AveragedModel's state is ``module.<key>``
    plus ``n_averaged``), or None unless the checkpoint has ``<name>_ema.pt`` for every one of them."""
    if not names or not all((Path(directory) / f"{n}_ema.pt").is_file() for n in names):
        return None
    ema = load_states(directory, [f"{n}_ema" for n in names], map_location=map_location)
    return {n: {k[7:]: v for k, v in ema[f"{n}_ema"].items() if k.startswith("module.")} for n in names}


def load_state_file(path: Path, map_location="cpu") -> dict:
    """One state file, with weights_only=True; a refused or unreadable file is a ``CheckpointError`` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except torch.OutOfMemoryError:  # the device's fault, not the file's: every rank must see the same verdict
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"'{path}' holds pickled Python objects, which are not loaded (a checkpoint holds plain tensors and "
            f"numbers only: loading objects could run code); it was not written by hdebm-ray"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is corrupt or truncated ({type(e).__name__}: {e})") from None


def checkpoint_meta(
    stage, step: int, resumed_from_step: int = 0, metrics: dict | None = None, guard: list | None = None
) -> dict:
    """A checkpoint's meta.json; ``guard``: the divergence guard's rollbacks of the stage so far."""
    return {
        "guard": {"rollbacks": list(guard or [])},
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},  # the report this checkpoint rode on
        "stage": stage.name,
        "step": step,
        "nimg": step * stage.images_per_step,
        "resumed_from_step": resumed_from_step,
        "total_steps": stage.total_steps,
        "done": step >= stage.total_steps,
        "summary": stage.summary(),
        "saved_at": time.time(),
    }


def weights_mismatch(ckpt_dir, err: RuntimeError) -> RuntimeError:
    """torch's multi-line "Error(s) in loading state_dict" as a ``CheckpointError`` naming the checkpoint and the first
    mismatch; any other error as it is."""
    text = str(err)
    if "in loading state_dict" not in text:
        return err
    detail = next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), text.splitlines()[0])
    return CheckpointError(
        f"checkpoint '{ckpt_dir}': its weights do not fit the networks its config builds ({detail.rstrip('.')}); "
        "was network.* changed, or config.yaml replaced?"
    )


def restore(stage, ckpt_dir, device) -> dict:
    """Load a checkpoint into a stage; returns its metadata (``meta["step"]`` is where to continue)."""
    try:
        stage.load_state_dict(load_states(ckpt_dir, map_location=device))
    except RuntimeError as e:
        raise weights_mismatch(ckpt_dir, e) from None
    meta = load_meta(ckpt_dir)
    stage.load_summary(meta.get("summary", {}))
    return meta


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The complete (and, under Ray, registered) checkpoint folder of a stage with the highest step, None if it has
    none; ``stage_dir`` is a local path (``newest_checkpoint`` takes URIs too)."""
    found = newest_checkpoint(str(stage_dir))
    return Path(found) if found is not None else None


def newest_checkpoint(stage_dir: str) -> str | None:
    """``latest_checkpoint`` of a stage folder given as a local path or a URI."""
    run_location, name = stage_dir.rstrip("/").rsplit("/", 1)
    found = run_checkpoints(run_location, [name])
    return max(found, key=lambda c: load_meta(c)["step"]) if found else None


def checkpoint_steps(stage_dir: str) -> set[int]:
    """The steps of the checkpoint folders in a stage's folder, from their names (``checkpoint_<step>[_<ms>]``;
    complete or not): one listing, no file read."""
    steps = set()
    for folder, _ in storage.list_dirs(stage_dir):
        name = folder.rsplit("/", 1)[-1]
        digits = name.removeprefix("checkpoint_").split("_", 1)[0]
        if name.startswith("checkpoint_") and digits.isdigit():
            steps.add(int(digits))
    return steps


def checkpoint_or_newest(location: str) -> str:
    """``location`` if it is a checkpoint, else the newest complete checkpoint of the stage folder it names (what
    ``sample --checkpoint runs/x/stage2`` means); ``CheckpointError`` saying which when it is neither."""
    if storage.exists(f"{location}/{META_FILE}"):
        if (why := incomplete(location)) is not None:
            raise CheckpointError(f"'{location}' is not a complete checkpoint directory: {why}")
        return location
    if not storage.exists(location):
        raise CheckpointError(f"'{location}' does not exist")
    newest = newest_checkpoint(location)
    if newest is None:
        raise CheckpointError(
            f"'{location}' is neither a checkpoint directory (no {META_FILE}) nor a stage folder with a complete "
            "checkpoint_* in it"
        )
    return newest


def save_checkpoint_atomically(directory: Path, states: dict[str, dict], config: Config, meta: dict) -> Path:
    """``save_checkpoint`` into a temporary sibling, renamed into place: a crash never leaves half of one."""
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:12]}.tmp")  # no writer shares it
    save_checkpoint(tmp, states, config, meta)
    if directory.exists():  # the same step again (a re-run that finished nothing new): replace it
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


# Ray Train's record of the checkpoints it registered, in each stage's folder (Ray 2.60's file name).
RAY_CHECKPOINT_REGISTRY = "checkpoint_manager_snapshot.json"


def registered_names(stage_location: str) -> set[str] | None:
    """The checkpoint folders Ray Train registered for a stage; None where it keeps no record (in-process runs).
    A checkpoint written but not registered (the driver died in between) is superseded when the run resumes."""
    path = f"{stage_location}/{RAY_CHECKPOINT_REGISTRY}"
    if not storage.exists(path):
        return None
    try:
        results = json.loads(storage.read_text(path)).get("checkpoint_results", [])
        return {r["checkpoint_dir_name"] for r in results}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a record this code cannot read: every complete checkpoint counts, as before


def run_checkpoints(run_location: str, stages=None) -> list[str]:
    """Every registered, complete checkpoint of the given stages (default: all) under a run (local path or URI),
    oldest first per stage; paths as the eval pool records them, so the pool and ``hdebm-ray eval`` agree on
    what is scored."""
    if stages is None:
        fs, base = fs_and_path(run_location)
        stages = sorted(
            i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.Directory
        )
    found = []
    for stage in stages:
        fs, base = fs_and_path(f"{run_location}/{stage}")
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            continue
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.Directory]
        ckpts = sorted(d for d in dirs if d.rsplit("/", 1)[-1].startswith("checkpoint_"))
        if (names := registered_names(f"{run_location}/{stage}")) is not None:
            ckpts = [d for d in ckpts if d.rsplit("/", 1)[-1] in names]
        # complete ones only: meta.json is written last and lists every state file's size
        found += [uri for uri in (as_uri(d, run_location) for d in ckpts) if incomplete(uri) is None]
    return found
