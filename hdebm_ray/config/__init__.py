"""Run configuration: frozen dataclasses, YAML presets, dotted overrides and validation.

A config is resolved in layers: dataclass defaults < preset YAML (shipped in ``hdebm_ray/presets``) <
``--config FILE`` < repeated ``--set dotted.key=value``. Every layer is checked against the dataclasses, so an
unknown key, a value of the wrong type or a value out of range fails before any work starts, with a message that
names the dotted key and what is allowed. Field metadata (``lo``/``hi``/``choices``) carries the ranges.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .baselines import ICDSection, MEBMSection, MJEMSection
from .compute_support import problem as compute_problem
from .schema import (
    ComputeSection,
    DataSection,
    DiffusionSection,
    DistillSection,
    EvalSection,
    GuardSection,
    NetworkSection,
    RaySection,
    RunSection,
    Stage1Section,
    Stage2Section,
)


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class Config:
    run: RunSection = RunSection()
    ray: RaySection = RaySection()
    data: DataSection = DataSection()
    network: NetworkSection = NetworkSection()
    diffusion: DiffusionSection = DiffusionSection()
    distill: DistillSection = DistillSection()
    stage1: Stage1Section = Stage1Section()
    stage2: Stage2Section = Stage2Section()
    mebm: MEBMSection = MEBMSection()
    mjem: MJEMSection = MJEMSection()
    icd: ICDSection = ICDSection()
    eval: EvalSection = EvalSection()
    compute: ComputeSection = ComputeSection()
    guard: GuardSection = GuardSection()

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted keys overridden, validated: ``cfg.replace(**{"stage1.steps": 10})``."""
        tree = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(tree, key, value)
        return from_dict(tree)

    def scaled(self, keys: Iterable[str], factor: float) -> Config:
        """A copy with each dotted key's value multiplied by ``factor`` (step sizes, learning rates)."""
        return self.replace(**{key: reduce(getattr, key.split("."), self) * factor for key in keys})


# ----------------------------------------------------------------------------------------------------------------
# Building and checking


def to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, typ: Any, meta: dict) -> Any:
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
        out = tuple(_coerce(f"{key}[{i}]", v, elem_t, {}) for i, v in enumerate(value))
        for i, v in enumerate(out):
            _check_range(f"{key}[{i}]", v, meta)
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


def _check_range(key: str, value: Any, meta: dict) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
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
                parts.append(f"<= {hi}")
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: must be {' and '.join(parts)}")


def _build(cls, tree: dict, prefix: str):
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
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ, dict(f.metadata))
            if typing.get_origin(typ) is not tuple:
                _check_range(key, kwargs[name], dict(f.metadata))
    return cls(**kwargs)


def from_dict(tree: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def validate(cfg: Config) -> None:
    """Checks that relate several keys; single-key ranges are checked while building."""
    d, n = cfg.diffusion, cfg.ray.num_workers
    sha = cfg.eval.inception_sha256
    if sha and not (len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)):
        raise ConfigError(f"config key 'eval.inception_sha256' = {sha!r} must be 64 hex digits (or '')")
    if d.T_trunc >= d.T:
        raise ConfigError(f"config key 'diffusion.T_trunc' = {d.T_trunc} must be < diffusion.T = {d.T}")
    n0 = cfg.distill.n0_steps
    if not _is_pow2(n0) or d.T_trunc % n0 != 0:
        raise ConfigError(
            f"config key 'distill.n0_steps' = {n0} must be a power of two that divides diffusion.T_trunc = {d.T_trunc}"
        )
    for section in ("diffusion", "distill", "stage1", "stage2", "mebm", "mjem", "icd"):
        sec = getattr(cfg, section)
        if sec.batch_size % n != 0:
            raise ConfigError(
                f"config key '{section}.batch_size' = {sec.batch_size} must be divisible by ray.num_workers = {n}"
            )
        if sec.checkpoint_every % sec.report_every != 0:
            raise ConfigError(
                f"config key '{section}.checkpoint_every' = {sec.checkpoint_every} must be a multiple of "
                f"{section}.report_every = {sec.report_every} (checkpoints ride on reports)"
            )
    _validate_replay_ebms(cfg)
    if (why := compute_problem(cfg.compute, cfg.ray.use_gpu)) is not None:
        raise ConfigError(why)
    if cfg.stage1.bank_size < cfg.stage1.batch_size:
        raise ConfigError(
            f"config key 'stage1.bank_size' = {cfg.stage1.bank_size} must be >= stage1.batch_size = "
            f"{cfg.stage1.batch_size} (each step leases a batch of distinct slots)"
        )
    data = cfg.data
    if data.loader == "ray_data" and data.dataset not in ("image_folder", "parquet"):
        raise ConfigError(
            f"config key 'data.loader' = 'ray_data' streams image_folder / parquet files; data.dataset = "
            f"{data.dataset!r} is held in memory (use data.loader = auto or torch)"
        )
    if data.dataset == "toy2d" and cfg.network.generator.kind != "resnet":
        raise ConfigError("config key 'network.generator.kind' must be 'resnet' for toy2d (an MLP generator is used)")
    heads = cfg.network.unet.num_head_channels
    if heads and any(cfg.network.unet.channels * m % heads for m in cfg.network.unet.channel_mult):
        raise ConfigError(
            f"config key 'network.unet.num_head_channels' = {heads} must divide every level's width "
            f"(network.unet.channels * channel_mult)"
        )
    if data.dataset != "toy2d":
        if not _is_pow2(data.resolution):
            raise ConfigError(f"config key 'data.resolution' = {data.resolution} must be a power of two")
        bad = [r for r in cfg.network.unet.attn_resolutions if r > data.resolution]
        if bad:
            raise ConfigError(
                f"config key 'network.unet.attn_resolutions' has {bad[0]} > data.resolution = {data.resolution}"
            )
        levels = len(cfg.network.unet.channel_mult)
        if data.resolution // 2 ** (levels - 1) < 4:
            raise ConfigError(
                f"config key 'network.unet.channel_mult' has {levels} levels: too many for data.resolution = "
                f"{data.resolution} (the lowest level must stay >= 4 px)"
            )
    if data.dataset in ("image_folder", "parquet") and not data.path:
        raise ConfigError(
            f"config key 'data.path' must name the {data.dataset} folder for data.dataset = {data.dataset!r}"
        )


def _validate_replay_ebms(cfg: Config) -> None:
    """The baselines' keys that relate to each other (what depends on the data: ``check_stage``)."""
    for name in ("mebm", "mjem", "icd"):
        sec = getattr(cfg, name)
        if len(sec.adam_betas) != 2:
            raise ConfigError(f"config key '{name}.adam_betas' = {list(sec.adam_betas)} must hold two numbers")
        for key in ("augment_crop_area", "augment_crop_ratio"):
            pair = getattr(sec, key)
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] <= 0:
                raise ConfigError(f"config key '{name}.{key}' = {list(pair)} must be [min, max] with 0 < min <= max")
        if sec.buffer_size < sec.batch_size:
            raise ConfigError(
                f"config key '{name}.buffer_size' = {sec.buffer_size} must be >= {name}.batch_size = "
                f"{sec.batch_size} (each step leases a batch of distinct chains)"
            )
        if sec.sample_augment_every and not sec.augment:
            raise ConfigError(
                f"config key '{name}.sample_augment_every' = {sec.sample_augment_every} needs {name}.augment"
            )
    if cfg.mjem.multiscale:
        raise ConfigError("config key 'mjem.multiscale' must be false: M-JEM's classifier has one trunk")
    n = cfg.ray.num_workers
    if cfg.mjem.classifier_batch_size % n != 0:
        raise ConfigError(
            f"config key 'mjem.classifier_batch_size' = {cfg.mjem.classifier_batch_size} must be divisible by "
            f"ray.num_workers = {n}"
        )


def check_stage(cfg: Config, stage: str) -> None:
    """Checks of the one stage about to run against the data (a toy2d run need not fix the image baselines'
    augmentations it never uses); the CLI calls it before Ray starts, the stage again when it is built."""
    if stage not in ("mebm", "mjem", "icd"):
        return
    from ..data.augment import IMAGE_AUGMENTS, VECTOR_AUGMENTS

    vector = cfg.data.dataset == "toy2d"
    allowed = VECTOR_AUGMENTS if vector else IMAGE_AUGMENTS
    wrong = [a for a in getattr(cfg, stage).augment if a not in allowed]
    if wrong:
        kind = "toy2d vectors" if vector else "images"
        raise ConfigError(
            f"config key '{stage}.augment' has {wrong[0]!r}, which does not apply to {kind}; use {', '.join(allowed)}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Layers: presets, files, overrides


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("hdebm_ray.presets").iterdir() if p.name.endswith(".yaml"))


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
    return _read_yaml(text, f"preset '{name}'")


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


def key_type(key: str):
    """The declared type of a dotted config key (``int``, ``float``, ``str``, ``bool``, ``tuple[...]``);
    ConfigError for a key that does not exist."""
    cls = Config
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


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is not a section)")
        node = node[p]
    node[parts[-1]] = value


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
        tree = _merge(tree, _read_yaml(path.read_text(), f"config file '{path}'"))
    # Build once before overrides so a bad key in the files is reported against the file, not an override.
    _build(Config, tree, "")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(tree)
