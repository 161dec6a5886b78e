"""Building a config tree against its dataclasses: values coerced to each field's type and checked against its
declared range (``knob``'s ``lo`` / ``hi`` / ``choices``), unknown keys refused, every error one line naming the
dotted key."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


def to_plain(obj) -> Any:
    """A dataclass tree as plain dicts and lists (YAML / JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj


def coerce(key: str, value: Any, typ: Any, meta: dict) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (elem_t, _) = typing.get_args(typ)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list of {elem_t.__name__}, got {value!r}")
        out = tuple(coerce(f"{key}[{i}]", v, elem_t, {}) for i, v in enumerate(value))
        for i, v in enumerate(out):
            check_range(f"{key}[{i}]", v, meta)
        return out
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            out = float(value)  # also accepts "1e-3", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
        return out
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")


# The upper bound of every number whose key declares none: no run counts, holds, scales or waits for more (steps,
# slots, channels, samples, step sizes, seconds); beyond it a value is a typo, and would otherwise pass --dry-run.
CEILING = 1e9


def check_range(key: str, value: Any, meta: dict) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if hi is None and choices is None:
        hi = CEILING
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo_open = meta.get("lo_open", False)
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and value > hi
        if below or above:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo}")
            if hi is not None:
                parts.append(f"<= {hi:g}")
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: must be {' and '.join(parts)}")


def build(cls, tree: dict, prefix: str):
    if not isinstance(tree, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys under '{prefix.rstrip('.') or '<root>'}': "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in tree.items():
        f, typ, key = fields[name], hints[name], prefix + name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = build(typ, value, key + ".")
        else:
            kwargs[name] = coerce(key, value, typ, dict(f.metadata))
            if typing.get_origin(typ) is not tuple:
                check_range(key, kwargs[name], dict(f.metadata))
    return cls(**kwargs)


def type_at(root, key: str):
    """The declared type of dotted ``key`` under the dataclass ``root`` (``int``, ``float``, ``str``, ``bool``,
    ``tuple[...]``); ConfigError for a key that does not exist or names a section."""
    cls = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}')")
        cls = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is not a section)")
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"config key '{key}' is a section, not a value")
    return cls


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in a nested dict whose sections exist; ConfigError if a part is not a section."""
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is not a section)")
        node = node[p]
    node[parts[-1]] = value
