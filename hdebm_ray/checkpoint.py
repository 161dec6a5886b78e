"""Checkpoints as plain directories: one ``<name>.pt`` state_dict per component, ``config.yaml`` and ``meta.json``.

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint never holds pickled objects, so loading
one cannot run code, and it stays readable without this package's classes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import storage
from .config import Config, load_config

META_FILE, CONFIG_FILE = "meta.json", "config.yaml"


def save_checkpoint(directory: str | Path, states: dict[str, dict], config: Config, meta: dict[str, Any]) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        torch.save(state, out / f"{name}.pt")
    (out / CONFIG_FILE).write_text(config.to_yaml())
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def load_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json; ``directory`` may be a local path or a storage URI (s3://, gs://, file://)."""
    path = f"{directory}/{META_FILE}"
    if not storage.exists(path):
        raise FileNotFoundError(f"'{directory}' is not a checkpoint directory (no {META_FILE})")
    return json.loads(storage.read_text(path))


def load_config_of(directory: str | Path) -> Config:
    return load_config(config_file=Path(directory) / CONFIG_FILE)


def load_states(directory: str | Path, names: list[str] | None = None, map_location="cpu") -> dict[str, dict]:
    """The named (default: all) state_dicts of a checkpoint, loaded with ``weights_only=True``."""
    d = Path(directory)
    names = names if names is not None else sorted(p.stem for p in d.glob("*.pt"))
    missing = [n for n in names if not (d / f"{n}.pt").is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint '{d}' has no {missing[0]}.pt (has {sorted(p.name for p in d.glob('*.pt'))})"
        )
    return {n: torch.load(d / f"{n}.pt", map_location=map_location, weights_only=True) for n in names}


def checkpoint_meta(stage, step: int, resumed_from_step: int = 0, metrics: dict | None = None) -> dict:
    return {
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


def restore(stage, ckpt_dir, device) -> dict:
    """Load a checkpoint into a stage; returns its metadata (``meta["step"]`` is where to continue)."""
    stage.load_state_dict(load_states(ckpt_dir, map_location=device))
    meta = load_meta(ckpt_dir)
    stage.load_summary(meta.get("summary", {}))
    return meta


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint of ``out_dir`` with the highest step, None if it has none."""
    ckpts = sorted(out_dir.glob("checkpoint_*"), key=lambda p: load_meta(p)["step"])
    return ckpts[-1] if ckpts else None
