"""The run's config: sections of documented, range-checked keys (``schema.py``, ``baselines.py``), the ``Config``
that holds them and its cross-key checks (``root.py``), resolved in layers from presets, files and ``--set``
(``load.py``). What the rest of the package uses is re-exported here."""

from .load import (
    load_config,
    load_preset,
    parse_config,
    parse_override,
    parse_tree,
    preset_names,
    preset_summary,
    yaml_problem,
)
from .root import Config, check_stage, from_dict, key_type, validate
from .tree import ConfigError, to_plain

__all__ = [
    "Config",
    "ConfigError",
    "check_stage",
    "from_dict",
    "key_type",
    "load_config",
    "load_preset",
    "parse_config",
    "parse_override",
    "parse_tree",
    "preset_names",
    "preset_summary",
    "to_plain",
    "validate",
    "yaml_problem",
]
