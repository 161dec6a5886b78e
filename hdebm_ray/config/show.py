"""``hdebm-ray config show``: the config schema as a table of keys, values, ranges and descriptions.

Every key of the schema (``config_schema.py``) is one row: its dotted key, type, default (or the value that a
preset, a config file and ``--set`` overrides resolve it to), allowed range or choices, and its one-line doc.
``config show [--preset NAME] [KEY-PREFIX]`` prints the rows under a key prefix (``stage1.langevin``, ``data``);
the same rows generate the reference docs/config.md, which tests/test_config_docs.py keeps in sync::

    python -m hdebm_ray.config.show --markdown > docs/config.md

The CLI adds the ``config`` command with ``add_config_parser(subparsers)``; its ``show`` subcommand runs ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import Config, ConfigError, load_config, preset_names

REGENERATE = "python -m hdebm_ray.config.show --markdown > docs/config.md"


@dataclass(frozen=True)
class KeyRow:
    """One config key: ``section`` is the dotted section that holds it (``stage1.langevin``)."""

    key: str
    section: str
    type: str
    default: Any
    value: Any
    range: str
    doc: str


# ----------------------------------------------------------------------------------------------------------------
# Rows


def type_name(typ) -> str:
    if typing.get_origin(typ) is tuple:
        return f"list[{typing.get_args(typ)[0].__name__}]"
    return typ.__name__


def format_value(value) -> str:
    """A value as it is written in YAML or after ``--set``: true / false, '' for an empty string, [a, b]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value)


def range_text(meta: typing.Mapping, is_list: bool = False) -> str:
    """The allowed values, as the config errors state them: ``>= 1``, ``> 0.0``, ``[0.0, 0.9]``, ``one of a, b``."""
    choices, lo, hi, lo_open = meta.get("choices"), meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    if choices is not None:
        return ("any of " if is_list else "one of ") + ", ".join(format_value(c) for c in choices)
    if lo is not None and hi is not None:
        text = f"{'(' if lo_open else '['}{lo}, {hi}]"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        text = f"<= {hi}"
    else:
        return ""
    return f"each {text}" if is_list else text


def _walk(cls, defaults, values, prefix: str) -> Iterable[KeyRow]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(typ):
            yield from _walk(typ, getattr(defaults, f.name), getattr(values, f.name), key + ".")
            continue
        yield KeyRow(
            key=key,
            section=prefix.rstrip("."),
            type=type_name(typ),
            default=getattr(defaults, f.name),
            value=getattr(values, f.name),
            range=range_text(f.metadata, typing.get_origin(typ) is tuple),
            doc=f.metadata.get("doc", ""),
        )


def schema_rows(cfg: Config | None = None) -> list[KeyRow]:
    """Every key of the schema in declaration order; ``value`` is ``cfg``'s (default: the defaults)."""
    defaults = Config()
    return list(_walk(Config, defaults, cfg if cfg is not None else defaults, ""))


def section_docs() -> dict[str, str]:
    """Each section's dotted name and the first paragraph of its class docstring."""
    out: dict[str, str] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                doc = (typ.__doc__ or "").strip().split("\n\n")[0]
                out[prefix + f.name] = " ".join(line.strip() for line in doc.splitlines())
                walk(typ, prefix + f.name + ".")

    walk(Config, "")
    return out


def filter_rows(rows: list[KeyRow], prefix: str | None) -> list[KeyRow]:
    """The rows whose key starts with ``prefix``; a prefix no key starts with is a ConfigError."""
    if not prefix:
        return rows
    kept = [r for r in rows if r.key.startswith(prefix)]
    if not kept:
        sections = ", ".join(dict.fromkeys(r.key.split(".")[0] for r in rows))
        raise ConfigError(f"unknown config key prefix '{prefix}': no key starts with it; sections are {sections}")
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Output


def text_table(rows: list[KeyRow], with_default: bool = False) -> str:
    """Aligned columns key, type, value (and default), range; the description last."""
    header = ["KEY", "TYPE", "VALUE"] + (["DEFAULT"] if with_default else []) + ["RANGE", "DESCRIPTION"]
    body = []
    for r in rows:
        cells = [r.key, r.type, format_value(r.value)] + ([format_value(r.default)] if with_default else [])
        body.append(cells + [r.range, r.doc])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def config_show_main(
    preset: str | None = None,
    prefix: str | None = None,
    config_file: str | None = None,
    overrides: Iterable[str] = (),
) -> str:
    """What ``hdebm-ray config show [--preset NAME] [--config FILE] [--set K=V] [KEY-PREFIX]`` prints: the keys
    under ``prefix`` with their resolved values; with a preset, file or override also their defaults."""
    overrides = list(overrides)
    resolved = bool(preset or config_file or overrides)
    cfg = load_config(preset, config_file, overrides) if resolved else None
    return text_table(filter_rows(schema_rows(cfg), prefix), with_default=resolved)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """docs/config.md: one table per section (key | default | range | description), in declaration order."""
    docs = section_docs()
    by_section: dict[str, list[KeyRow]] = {}
    for r in schema_rows():
        by_section.setdefault(r.section, []).append(r)
    out = [
        "# Config reference",
        "",
        f"<!-- Generated from hdebm_ray/config/schema.py by `{REGENERATE}`; do not edit. -->",
        "",
        "Every key of the config schema with its default, allowed range and description. A config resolves in "
        "layers: these defaults < `--preset NAME` (hdebm_ray/presets/) < `--config FILE` < repeated "
        "`--set dotted.key=value`. `hdebm-ray config show [--preset NAME] [KEY-PREFIX]` prints the same keys with "
        "the values a preset resolves them to. Lists are written `[a, b]` in YAML or `a,b` after `--set`; a "
        "list's range applies to each element; a number whose range shows no upper bound is at most 1e9.",
    ]
    for section, rows in by_section.items():
        out += ["", f"## `{section}`", "", docs[section], "", "| key | default | range | description |"]
        out.append("|---|---|---|---|")
        for r in rows:
            rng = f"`{_cell(r.range)}`" if r.range else ""
            out.append(f"| `{r.key}` | `{_cell(format_value(r.default))}` | {rng} | {_cell(r.doc)} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", metavar="KEY-PREFIX", help="only keys starting with this, e.g. stage1.langevin")
    p.add_argument("--preset", help=f"show the values this preset resolves to ({', '.join(preset_names())})")
    p.add_argument("--config", help="YAML file with config sections (over the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one dotted key")
    p.add_argument("--markdown", action="store_true", help="print the schema reference docs/config.md instead")


def add_config_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``config`` (with its ``show`` subcommand, which runs ``run``) to a CLI's subparsers."""
    p = subparsers.add_parser("config", help="the config schema: every key, its value, range and description")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="keys under KEY-PREFIX with their values (from --preset), ranges and docs")
    add_show_args(show)
    show.set_defaults(fn=run)
    return p


def run(args) -> int:
    if args.markdown:
        if args.preset or args.config or args.set or args.prefix:
            raise ConfigError(
                "--markdown prints the whole schema with its defaults: drop --preset, --config, --set and KEY-PREFIX"
            )
        print(markdown_table(), end="")
        return 0
    print(config_show_main(args.preset, args.prefix, args.config, args.set), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdebm_ray.config.show", description=__doc__.splitlines()[0])
    add_show_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"config show: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
