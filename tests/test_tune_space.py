"""Search-space files: the shipped ones load; bad keys, ranges and distributions fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hdebm_ray.config import ConfigError, load_config
from hdebm_ray.distributed.search_space import load_space, parse_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load_against_their_presets(path):
    preset = "toy2d" if "toy2d" in path.name else "digits"
    space = load_space(path, load_config(preset))
    assert space.params and space.mode in ("min", "max")
    tune_space = space.param_space()
    assert set(tune_space) == {p.key for p in space.params}


def space(params: str, head: str = "stage: stage1\nmetric: Energy/abs_gap\nmode: min\n") -> str:
    return head + "params:\n" + params


@pytest.mark.parametrize(
    "text, key, message",
    [
        (space("  stage1.langevin.stepsize: {uniform: [0.1, 0.2]}\n"), "stage1.langevin.stepsize", "unknown"),
        (space("  stage1.langevin.step_size: {loguniform: [0.0, 0.1]}\n"), "step_size", "lower > 0"),
        (space("  stage1.langevin.step_size: {uniform: [0.2, 0.1]}\n"), "step_size", "below upper"),
        (space("  stage1.langevin.step_size: {uniform: [-0.1, 0.1]}\n"), "step_size", "not a valid config value"),
        (space("  stage1.langevin.steps: {randint: [0, 10]}\n"), "stage1.langevin.steps", "not a valid config value"),
        (space("  stage1.langevin.steps: {randint: [1.5, 10]}\n"), "stage1.langevin.steps", "integers"),
        (space("  stage1.langevin.steps: {choice: []}\n"), "stage1.langevin.steps", "non-empty"),
        (space("  stage1.langevin.steps: {normal: [1, 2]}\n"), "stage1.langevin.steps", "unknown distribution"),
        (space("  stage1.lr_energy: {choice: [1e-4, fast]}\n"), "stage1.lr_energy", "not a valid config value"),
        (space("  stage1.steps: 10\n"), "stage1.steps", "expected one of"),
        ("stage: stage9\nmetric: m\nparams: {stage1.steps: {choice: [1]}}\n", "stage", "unknown stage"),
        ("stage: stage1\nmetric: m\nmode: best\nparams: {stage1.steps: {choice: [1]}}\n", "mode", "'min' or 'max'"),
        ("stage: stage1\nparams: {stage1.steps: {choice: [1]}}\n", "metric", "missing"),
        ("stage: stage1\nmetric: m\nsamples: 3\nparams: {stage1.steps: {choice: [1]}}\n", "samples", "unknown key"),
    ],
)
def test_bad_spaces_are_rejected_naming_the_key(text, key, message):
    with pytest.raises(ConfigError) as err:
        parse_space(text, "bad.yaml", load_config("digits"))
    assert key in str(err.value) and message in str(err.value) and "bad.yaml" in str(err.value)


def test_distributions_map_to_ray_tune_domains():
    from ray import tune

    text = space(
        "  stage1.langevin.step_size: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  stage1.lr_energy: {uniform: [1.0e-4, 2.0e-4]}\n"
        "  stage1.langevin.steps: {randint: [5, 8]}\n"
        "  stage1.beta2: {choice: [0.0, 0.1]}\n"
        "  stage1.lr_generator: {grid: [1.0e-4, 2.0e-4]}\n"
    )
    ps = parse_space(text, "s.yaml", load_config("digits")).param_space()
    assert isinstance(ps["stage1.langevin.step_size"], tune.search.sample.Float)
    assert ps["stage1.langevin.step_size"].lower == 1e-4
    assert isinstance(ps["stage1.langevin.steps"], tune.search.sample.Integer)
    assert ps["stage1.langevin.steps"].upper == 8  # exclusive, as Tune's randint
    assert ps["stage1.lr_generator"] == {"grid_search": [1e-4, 2e-4]}
    samples = {ps["stage1.langevin.steps"].sample() for _ in range(200)}
    assert samples == {5, 6, 7}


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path, capsys):
    import ray

    from hdebm_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(space("  stage1.langevin.stepsize: {uniform: [0.1, 0.2]}\n"))
    assert main(["tune", "--preset", "toy2d", "--space", str(bad), "--set", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "params.stage1.langevin.stepsize" in err and "bad.yaml" in err
    assert not ray.is_initialized() and not (tmp_path / "toy2d").exists()
