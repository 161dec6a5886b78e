"""The self-describing config: every key has a description, docs/config.md matches the schema, and
``config show`` prints a preset's resolved values under a key prefix."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from hdebm_ray.config import Config, ConfigError, load_config
from hdebm_ray.config import schema as config_schema
from hdebm_ray.config.show import REGENERATE, add_config_parser, config_show_main, markdown_table, schema_rows

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"
PRESET = Path(config_schema.__file__).parents[1] / "presets" / "cifar10.yaml"


def _sections(cls=Config, prefix=""):
    """(dotted name, class) of every section under ``cls``, nested ones included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield prefix + f.name, hints[f.name]
            yield from _sections(hints[f.name], prefix + f.name + ".")


def test_every_key_and_section_has_a_description():
    sections = dict(_sections())
    assert {"stage1", "stage1.langevin", "icd.langevin", "eval"} <= set(sections)
    missing = [
        f"{name}.{f.name}"
        for name, cls in sections.items()
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]) and not f.metadata.get("doc", "").strip()
    ]
    assert not missing, f"config keys without a doc= in hdebm_ray/config/schema.py: {', '.join(missing)}"
    # dataclass() writes "Name(field: type = ...)" as the docstring of a class that has none
    undocumented = [n for n, cls in sections.items() if (cls.__doc__ or "").startswith(f"{cls.__name__}(")]
    assert not undocumented, f"config sections without a docstring: {', '.join(undocumented)}"
    assert len(schema_rows()) == len({r.key for r in schema_rows()}) > 200


def test_ebm_sections_share_one_optimiser_declaration():
    shared = {f.name for f in dataclasses.fields(config_schema.EnergyOptimSection)}
    assert {"lr_schedule", "warmup_steps", "grad_clip", "data_jitter", "mad_filter", "mad_k"} <= shared
    for name in ("stage1", "stage2", "mebm", "mjem", "icd"):
        cls = type(getattr(Config(), name))
        assert issubclass(cls, config_schema.EnergyOptimSection), name
        # a redeclared default keeps the shared range and doc
        for f in dataclasses.fields(cls):
            if f.name in shared:
                base = config_schema.EnergyOptimSection.__dataclass_fields__[f.name].metadata
                assert dict(f.metadata) == dict(base), f"{name}.{f.name}"
    assert Config().mebm.grad_clip == 0.0 and Config().stage1.grad_clip == 50.0 and Config().stage2.steps == 300


def test_docs_config_md_matches_the_schema():
    assert DOCS.is_file(), f"docs/config.md is missing; generate it with: {REGENERATE}"
    assert DOCS.read_text() == markdown_table(), (
        f"docs/config.md is out of date with hdebm_ray/config/schema.py; regenerate it with: {REGENERATE}"
    )
    assert "| `stage1.langevin.step_size` | `0.0005` | `> 0.0` |" in DOCS.read_text()


def _row(text: str, key: str) -> list[str]:
    lines = [line.split() for line in text.splitlines() if line.split()[0] == key]
    assert len(lines) == 1, f"{key} not in:\n{text}"
    return lines[0]


def test_config_show_prints_the_presets_values_under_a_prefix():
    preset = yaml.safe_load(PRESET.read_text())
    assert preset["stage1"]["lr_energy"] == 5.0e-6 and preset["stage1"]["langevin"]["steps"] == 50
    assert Config().stage1.lr_energy == 1e-4 and Config().stage1.langevin.steps == 20

    out = config_show_main("cifar10", "stage1")
    keys = [line.split()[0] for line in out.splitlines()[1:]]
    assert keys and all(k.startswith("stage1.") for k in keys)
    assert {"stage1.lr_energy", "stage1.langevin.steps", "stage1.grad_clip"} <= set(keys)
    assert out.splitlines()[0].split()[:4] == ["KEY", "TYPE", "VALUE", "DEFAULT"]
    assert _row(out, "stage1.lr_energy")[:4] == ["stage1.lr_energy", "float", "5e-06", "0.0001"]
    assert _row(out, "stage1.langevin.steps")[:5] == ["stage1.langevin.steps", "int", "50", "20", ">="]
    assert "Adam learning rate of H" in out

    # a narrower prefix, and the defaults without a preset
    out = config_show_main(None, "stage1.langevin")
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        f"stage1.langevin.{k}" for k in ("steps", "step_size", "temperature", "drift_clip")
    ]
    assert _row(out, "stage1.langevin.steps")[2] == "20" and "DEFAULT" not in out.splitlines()[0]
    # --set applies on top of the preset
    out = config_show_main("cifar10", "data.res", overrides=["data.resolution=64"])
    assert _row(out, "data.resolution")[:4] == ["data.resolution", "int", "64", "16"]
    assert load_config("cifar10").data.resolution == 32


def test_config_show_through_the_config_command(capsys):
    parser = argparse.ArgumentParser(prog="hdebm-ray")
    add_config_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["config", "show", "--preset", "cifar10", "mebm.langevin"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert out == config_show_main("cifar10", "mebm.langevin")
    assert _row(out, "mebm.langevin.grad_clamp")[2:4] == ["1.0", "1.0"]  # the section's own default for a nested key


@pytest.mark.parametrize("prefix", ["stage9", "data.nope", "Stage1"])
def test_unknown_prefix_is_a_config_error_naming_it(prefix):
    with pytest.raises(ConfigError) as e:
        config_show_main("digits", prefix)
    msg = str(e.value)
    assert f"'{prefix}'" in msg and "\n" not in msg, msg
    assert "stage1" in msg  # says which sections there are
