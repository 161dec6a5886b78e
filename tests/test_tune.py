"""A real Ray Tune sweep on toy2d Stage 1 (Train V2: one TorchTrainer per trial, its own bank actor) under ASHA.
PBT, the sweep's outputs and resuming an interrupted sweep: test_tune_resume."""

from __future__ import annotations

import pytest
from helpers import TOY_TRIAL, distilled_toy

from hdebm_ray.config import load_config
from hdebm_ray.distributed.search_space import parse_space
from hdebm_ray.distributed.sweep import SweepOptions, build_tuner, leftover_bank_actors


@pytest.fixture(scope="module")
def toy_distilled(tmp_path_factory):
    return distilled_toy(tmp_path_factory.mktemp("toy"))


def step_size_space(values) -> str:
    return (
        "stage: stage1\nmetric: Eval/toy2d_quality\nmode: max\n"
        f"params:\n  stage1.langevin.step_size: {{grid: {list(values)}}}\n"
    )


def test_asha_stops_a_diverging_step_size_early_and_lets_a_sane_one_finish(ray_local, tmp_path, toy_distilled):
    base = load_config("toy2d", overrides=[f"run.storage_path={tmp_path}", "run.name=toy", *TOY_TRIAL])
    # one at a time, the sane trial first: ASHA then compares the diverging one against a recorded rung
    space = parse_space(step_size_space([5.0e-3, 5.0]), "inline", base)
    opts = SweepOptions(name="asha", samples=1, scheduler="asha", max_concurrent=1, grace_period=1)
    results = build_tuner(base, space, toy_distilled, opts).fit()
    by_step = {r.config["stage1.langevin.step_size"]: r.metrics for r in results}
    sane, wild = by_step[5.0e-3], by_step[5.0]
    assert sane["training_iteration"] == 4 and sane["step"] == 40  # ran to the end
    assert wild["training_iteration"] < 4 and wild["step"] < 40  # stopped early
    assert wild["Eval/toy2d_quality"] < sane["Eval/toy2d_quality"]
    assert leftover_bank_actors() == []
