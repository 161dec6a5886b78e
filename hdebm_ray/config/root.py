"""The run's config: ``Config``, one frozen dataclass section per concern (``schema.py``, ``baselines.py``), and
the checks that relate several keys, run whenever a config is built (``from_dict``), so a config that exists is a
valid one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce
from typing import Any

import yaml

from .baselines import IMAGE_AUGMENTS, VECTOR_AUGMENTS, ICDSection, MEBMSection, MJEMSection, ReplayEBMSection
from .compute_support import problem as compute_problem
from .renamed import current_key
from .runtime import ComputeSection, EvalSection, GuardSection, RaySection, RunSection
from .schema import (
    STAGE_NAMES,
    DataSection,
    DiffusionSection,
    DistillSection,
    NetworkSection,
    Stage1Section,
    Stage2Section,
)
from .tree import ConfigError, build, set_dotted, to_plain, type_at


@dataclass(frozen=True)
class Config:
    """Every section of a run's config; the stages' sections are named after the stages (``schema.STAGE_NAMES``)."""

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
            set_dotted(tree, current_key(key), value)
        return from_dict(tree)

    def scaled(self, keys: Iterable[str], factor: float) -> Config:
        """A copy with each dotted key's value multiplied by ``factor`` (step sizes, learning rates)."""
        return self.replace(**{key: reduce(getattr, key.split("."), self) * factor for key in keys})


def from_dict(tree: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    cfg = build(Config, tree, "")
    validate(cfg)
    return cfg


def key_type(key: str):
    """The declared type of a dotted config key (``int``, ``float``, ``str``, ``bool``, ``tuple[...]``);
    ConfigError for a key that does not exist."""
    return type_at(Config, current_key(key))


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


SECRET_QUERY = ("access_key", "secret_key", "secret", "session_token", "token", "password", "credential")


def refuse_credentials(key: str, value: str) -> None:
    """A URI with credentials in it (``s3://KEY:SECRET@bucket``, ``?secret_key=``) would be written into every
    checkpoint's config.yaml and the job's logs: refused, without repeating it."""
    if "://" not in value:
        return
    rest = value.split("://", 1)[1]
    authority, _, query = rest.partition("?")
    userinfo = "@" in authority.split("/", 1)[0]
    secret = any(part.split("=", 1)[0].lower() in SECRET_QUERY for part in query.split("&") if part)
    if userinfo or secret:
        raise ConfigError(
            f"config key '{key}' carries credentials in its URI; give them through the environment, a credentials "
            "file or the node's role instead (they would be copied into every checkpoint's config.yaml)"
        )


def validate(cfg: Config) -> None:
    """Checks that relate several keys; single-key ranges are checked while building."""
    refuse_credentials("run.storage_path", cfg.run.storage_path)
    refuse_credentials("data.path", cfg.data.path)
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
    low = cfg.ray.elastic_min_workers
    if low > n:
        raise ConfigError(f"config key 'ray.elastic_min_workers' = {low} must be <= ray.num_workers = {n}")
    group_sizes = range(low, n + 1) if low else (n,)  # an elastic group may restart at any size in between
    for section in STAGE_NAMES:
        sec = getattr(cfg, section)
        for size in group_sizes:
            if sec.batch_size % size != 0:
                key = "ray.num_workers" if size == n else f"{size} workers (ray.elastic_min_workers = {low})"
                raise ConfigError(
                    f"config key '{section}.batch_size' = {sec.batch_size} must be divisible by {key} = {size}"
                    if size == n
                    else f"config key '{section}.batch_size' = {sec.batch_size} must be divisible by {key}: the "
                    "global batch is kept whatever the group's size"
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
    for name in STAGE_NAMES:
        sec = getattr(cfg, name)
        if not isinstance(sec, ReplayEBMSection):
            continue
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
    n, low = cfg.ray.num_workers, cfg.ray.elastic_min_workers
    for size in range(low, n + 1) if low else (n,):  # an elastic group may restart at any size in between
        if cfg.mjem.classifier_batch_size % size != 0:
            group = "ray.num_workers" if size == n else f"{size} workers (ray.elastic_min_workers = {low})"
            raise ConfigError(
                f"config key 'mjem.classifier_batch_size' = {cfg.mjem.classifier_batch_size} must be divisible by "
                f"{group} = {size}"
            )


def check_stage(cfg: Config, stage: str) -> None:
    """Checks of the one stage about to run against the data (a toy2d run need not fix the image baselines'
    augmentations it never uses); the CLI calls it before Ray starts, the stage again when it is built."""
    if not isinstance(getattr(cfg, stage, None), ReplayEBMSection):
        return
    vector = cfg.data.dataset == "toy2d"
    allowed = VECTOR_AUGMENTS if vector else IMAGE_AUGMENTS
    wrong = [a for a in getattr(cfg, stage).augment if a not in allowed]
    if wrong:
        kind = "toy2d vectors" if vector else "images"
        raise ConfigError(
            f"config key '{stage}.augment' has {wrong[0]!r}, which does not apply to {kind}; use {', '.join(allowed)}"
        )
