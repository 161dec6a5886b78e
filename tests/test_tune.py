"""Real Ray Tune sweeps (Train V2: one TorchTrainer per trial): toy2d Stage 1 under ASHA (each trial with its own
bank actor), and a digits sweep ranked by the eval pool's FID of each trial's final checkpoint. PBT, the sweep's
outputs and resuming an interrupted sweep: test_tune_resume."""

from __future__ import annotations

import json
import math

import pytest
from helpers import TOY_TRIAL, distilled_toy, small_digits_overrides

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


def test_an_fid_sweep_ranks_each_trial_by_its_final_checkpoints_fid(ray_local, tmp_path):
    # The final checkpoint is scored after the stage's last report: without the trial's extra report, its last
    # Eval/fid would be the step-2 checkpoint's (or NaN).
    base = load_config(
        "digits",
        overrides=small_digits_overrides(str(tmp_path), "fidsweep")
        + [
            "diffusion.steps=4",
            "diffusion.report_every=1",
            "diffusion.checkpoint_every=2",
            "ray.num_workers=1",
            "eval.actors=1",
            "eval.stages=[diffusion]",
            "eval.features=raw",
            "eval.num_samples=64",
            f"data.path={tmp_path / 'data'}",
        ],
    )
    text = "stage: diffusion\nmetric: Eval/fid\nmode: min\nparams:\n  diffusion.lr: {grid: [3.0e-4, 1.0e-3]}\n"
    space = parse_space(text, "inline", base)
    results = build_tuner(base, space, None, SweepOptions(name="fid", samples=1)).fit()
    assert results.num_errors == 0 and len(results) == 2
    for result in results:
        last = result.metrics
        scored = tmp_path / "fid" / "trials" / f"trial-{last['trial_id']}" / "eval.jsonl"
        by_step = {r["step"]: r["fid"] for r in map(json.loads, scored.read_text().splitlines())}
        assert sorted(by_step) == [2, 4]
        assert last["Eval/fid_step"] == 4 and last["Eval/fid"] == pytest.approx(by_step[4], abs=1e-9)
        # the stage's own last metrics ride along (trials.csv keeps its columns)
        assert last["step"] == 4 and math.isfinite(last["Loss/diffusion"])
    best = results.get_best_result(metric="Eval/fid", mode="min", scope="last")
    assert best.metrics["Eval/fid"] == min(r.metrics["Eval/fid"] for r in results)
