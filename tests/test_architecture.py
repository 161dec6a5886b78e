"""The codebase's shape: Ray only in the adapters, no import cycles (deferred imports included), every stage with
a sampler, the implementations of the contracts, and the Ray version guard of the workarounds."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hdebm_ray
from hdebm_ray import contracts
from hdebm_ray.bank.client import LocalBankClient
from hdebm_ray.bank.service import BankService
from hdebm_ray.config import load_config
from hdebm_ray.contracts import WorkerContext
from hdebm_ray.stages import SAMPLERS, STAGES, build_stage

PACKAGE = Path(hdebm_ray.__file__).parent
ADAPTERS = "hdebm_ray.distributed"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports, at the top or inside a function, resolved to absolute names."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # ``from . import storage`` imports a module
    return names


def test_no_import_cycles_even_through_deferred_imports():
    modules = _modules()
    graph = {m: {i for i in _imports(m, p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle through them.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep) :] + [dep] if dep in trail else [m, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 60 and graph["hdebm_ray.evaluation.sampling"], "the graph was not built"


# The layers, top to bottom: a module may import its own layer and those below it, never one above (deferred imports
# included). docs/architecture.md describes each.
LAYERS = (
    ("cli",),
    ("distributed",),
    ("training",),
    ("evaluation",),
    ("stages",),
    ("bank",),
    ("core", "networks"),
    ("data",),
    ("io",),
    ("config", "presets"),
    ("contracts", "progress"),
)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return next((i for i, names in enumerate(LAYERS) if len(parts) > 1 and parts[1] in names), None)


def test_imports_point_down_the_layers():
    modules = _modules()
    unplaced = [m for m in modules if _layer(m) is None and m not in ("hdebm_ray", "hdebm_ray.__main__")]
    assert not unplaced, f"modules outside every layer: {unplaced}"
    upward = sorted(
        f"{m} -> {i}"
        for m, p in modules.items()
        if _layer(m) is not None
        for i in _imports(m, p)
        if i in modules and _layer(i) is not None and _layer(i) < _layer(m)
    )
    assert not upward, "imports from a lower layer to a higher one: " + "; ".join(upward)
    # the check can fail: the layers were recognised
    assert _layer("hdebm_ray.training.session") < _layer("hdebm_ray.stages.base") < _layer("hdebm_ray.config.root")


def test_every_registry_comes_from_the_stage_classes_and_matches_the_config():
    from hdebm_ray.config.schema import STAGE_NAMES
    from hdebm_ray.stages import GUARDED, PIPELINE, STAGE_CLASSES

    assert tuple(STAGES) == STAGE_NAMES == tuple(c.name for c in STAGE_CLASSES)
    assert PIPELINE == ["diffusion", "distill", "stage1", "stage2"]
    assert GUARDED == ("stage1", "stage2", "mebm", "mjem", "icd")
    cfg = load_config("digits")
    for cls in STAGE_CLASSES:
        assert cls.starts_from is None or cls.starts_from in STAGES, cls.name
        assert cls.section(cfg) is getattr(cfg, cls.name)
        if cls.backoff is not None:  # every key a rollback scales exists in the stage's section
            for key in cls.backoff.step_sizes + cls.backoff.lrs:
                assert isinstance(cfg.replace(**{f"{cls.name}.{key}": 1e-3}), type(cfg)), key
    assert {c.name for c in STAGE_CLASSES if c.bank_spec(cfg) is not None} == {"stage1", "mebm", "mjem", "icd"}


def test_ray_is_imported_only_by_the_adapter_subpackage():
    offenders = {
        m: sorted(i for i in _imports(m, p) if i == "ray" or i.startswith("ray."))
        for m, p in _modules().items()
        if not m.startswith(ADAPTERS)
    }
    assert not {m: i for m, i in offenders.items() if i}


def test_every_module_imports_in_a_fresh_interpreter_and_the_core_without_ray():
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    # the core, and the CLI: every command parses its flags, and the offline ones run, without loading Ray
    core = [m for m in names if not m.startswith(ADAPTERS)]
    script = (
        "import importlib, json, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "importlib.import_module('hdebm_ray.cli.main').build_parser()\n"
        "core_ray = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        f"for m in {names!r}: importlib.import_module(m)\n"
        "print(json.dumps({'core_ray': core_ray, 'n': len(sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["core_ray"] == [], "the pure-torch core imported Ray"


def test_every_stage_has_a_sampler_and_both_meet_their_contracts(tmp_path):
    assert set(SAMPLERS) == set(STAGES)
    stage_members = [n for n in dir(contracts.Stage) if not n.startswith("_")] + list(contracts.Stage.__annotations__)
    cfg = load_config("digits", overrides=[f"run.storage_path={tmp_path}"])
    stage = build_stage("diffusion", cfg, WorkerContext())
    assert isinstance(stage, contracts.Stage)
    assert not [n for n in stage_members if not hasattr(stage, n)]
    for name, cls in STAGES.items():
        missing = [n for n in dir(contracts.Stage) if not n.startswith("_") and not hasattr(cls, n)]
        assert not missing, f"{name}: {missing}"
    for name, cls in SAMPLERS.items():
        missing = [
            n
            for n in contracts.StageSampler.__annotations__
            if n in ("components", "ema_components", "start_name") and not hasattr(cls, n)
        ]
        assert not missing and callable(cls.sample_with_start), name
        assert cls.components, f"{name}'s sampler loads nothing"
        assert set(cls.ema_components) <= set(cls.components), name


def test_the_bank_clients_meet_the_bank_and_replay_contracts():
    bank = LocalBankClient(BankService(kind="bank", size=4, shapes={"x": (2,)}, snapshot_dir=None))
    replay = LocalBankClient(BankService(kind="replay", size=4, shapes={"x": (2,)}, snapshot_dir=None))
    assert isinstance(bank, contracts.BankClient) and isinstance(replay, contracts.ReplayClient)
    from hdebm_ray.distributed.bank_actor import ActorBankClient

    for protocol in (contracts.BankClient, contracts.ReplayClient):
        members = [n for n in dir(protocol) if not n.startswith("_")]
        assert not [n for n in members if not hasattr(ActorBankClient, n)], protocol.__name__


def test_an_untested_ray_version_fails_loudly_unless_allowed(monkeypatch):
    from hdebm_ray.distributed import ray_compat

    ray_compat.check_ray_version(ray_compat.TESTED_RAY + ".0")  # the tested one passes
    monkeypatch.delenv(ray_compat.ALLOW_ENV, raising=False)
    with pytest.raises(ray_compat.UntestedRayError, match="2.99.0 is installed"):
        ray_compat.check_ray_version("2.99.0")
    with pytest.raises(ray_compat.UntestedRayError):
        ray_compat.check_ray_version(ray_compat.TESTED_RAY + "1.0")  # 2.601 is not 2.60
    monkeypatch.setenv(ray_compat.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="2.99.0"):
        ray_compat.check_ray_version("2.99.0")
