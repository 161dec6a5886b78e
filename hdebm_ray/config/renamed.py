"""Config keys renamed in hdebm-ray 0.2, read under their old names (with a one-line notice each, once per process)
until 0.3: Stage 2's chain moved into its own ``stage2.langevin`` section, and the baselines' ``sgld`` section became
``langevin``, so that every stage's chain is ``<stage>.langevin``. Presets, config files, ``--set``, tune spaces and
old checkpoints' ``config.yaml`` all pass through here."""

from __future__ import annotations

import sys

from .tree import ConfigError

REMOVED_IN = "0.3"
RENAMED = {
    "stage2.langevin_steps": "stage2.langevin.steps",
    **{
        f"stage2.{key}": f"stage2.langevin.{key}"
        for key in (
            "y_step_size",
            "z1_step_size",
            "z2_step_size",
            "y_steps_per_latent_step",
            "latent_prior",
            "temperature",
            "drift_clip",
        )
    },
    # whole sections: every key under them
    **{f"{stage}.sgld": f"{stage}.langevin" for stage in ("mebm", "mjem", "icd")},
}
_noted: set[str] = set()


def _note(old: str, new: str, origin: str) -> None:
    if old not in _noted:
        _noted.add(old)
        where = f" (in {origin})" if origin else ""
        print(
            f"hdebm-ray: note: config key '{old}' is now '{new}'{where}; the old name is read until {REMOVED_IN}",
            file=sys.stderr,
            flush=True,
        )


def current_key(key: str, origin: str = "") -> str:
    """``key`` under its current name (a notice if it was renamed)."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            _note(old, new, origin)
            return new + key[len(old) :]
    return key


def current_tree(tree: dict, origin: str = "") -> dict:
    """A nested config dict with every renamed key moved to its current place (a notice for each)."""
    if not isinstance(tree, dict):
        return tree
    for old, new in RENAMED.items():
        *old_parents, old_leaf = old.split(".")
        node = tree
        for part in old_parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        target = tree
        for part in new_parents:
            target = target.setdefault(part, {}) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            raise ConfigError(f"config key '{'.'.join(new_parents)}' must be a mapping (moved here: '{old}')")
        if new_leaf in target and isinstance(value, dict) and isinstance(target[new_leaf], dict):
            value = {**value, **target[new_leaf]}  # both spellings of one section: the new name's keys win
        elif new_leaf in target:
            where = f" in {origin}" if origin else ""
            raise ConfigError(f"config keys '{old}' and '{new}' are both set{where}: keep '{new}'")
        target[new_leaf] = value
        _note(old, new, origin)
    return tree
