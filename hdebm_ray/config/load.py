"""Resolving a config in layers: dataclass defaults < preset YAML (shipped in ``hdebm_ray/presets``) <
``--config FILE`` < repeated ``--set dotted.key=value``. Every layer is checked against the dataclasses, so an
unknown key, a value of the wrong type or a value out of range fails before any work starts, with a message that
names the dotted key and what is allowed; keys renamed in this release are read with a one-line notice
(``renamed.py``)."""

from __future__ import annotations

import typing
from importlib import resources
from pathlib import Path

import yaml

from .renamed import current_key, current_tree
from .root import Config, from_dict
from .tree import ConfigError, build, set_dotted


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("hdebm_ray.presets").iterdir() if p.name.endswith(".yaml"))


def preset_summary(name: str) -> str:
    """The first sentence of the comment a preset's file opens with (what it is, for ``hdebm-ray presets``)."""
    text = resources.files("hdebm_ray.presets").joinpath(f"{name}.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    words = " ".join(lines)
    return words.split(". ")[0].rstrip(".") + "." if words else ""


def _read_yaml(text: str, origin: str) -> dict:
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin} must hold a mapping of config sections, got {type(tree).__name__}")
    return tree


def load_preset(name: str) -> dict:
    if name not in preset_names():
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(preset_names())}")
    text = resources.files("hdebm_ray.presets").joinpath(f"{name}.yaml").read_text()
    return current_tree(_read_yaml(text, f"preset '{name}'"), f"preset '{name}'")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_problem(err) -> str:
    """A YAML parse error in one line: what is wrong and where (PyYAML's own message spans several)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or str(err).splitlines()[0]}{where}"


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def load_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: typing.Iterable[str] = ()
) -> Config:
    """Resolve defaults < preset < config file < ``--set`` overrides into a validated Config."""
    tree = Config().to_dict()
    if preset:
        tree = _merge(tree, load_preset(preset))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        given = parse_tree(path.read_text(), f"config file '{path}'")
        if preset and set(_leaf_keys(tree)) <= set(_leaf_keys(given)):
            raise ConfigError(
                f"config file '{path}' sets every key (a full config, like a checkpoint's or a sweep's config.yaml), "
                f"so --preset {preset} would change nothing: drop --preset, or keep only the keys you change in it"
            )
        tree = _merge(tree, given)
    # Build once before overrides so a bad key in the files is reported against the file, not an override.
    build(Config, tree, "")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, current_key(key, "--set"), value)
    return from_dict(tree)


def _leaf_keys(tree: dict, prefix: str = "") -> typing.Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def parse_tree(text: str, origin: str) -> dict:
    """A YAML document of config sections (``origin`` names it in errors), with renamed keys moved to their names."""
    return current_tree(_read_yaml(text, origin), origin)


def parse_config(text: str, origin: str) -> Config:
    """A whole config from YAML text (e.g. a checkpoint's ``config.yaml``, read from any storage)."""
    return from_dict(_merge(Config().to_dict(), parse_tree(text, origin)))
