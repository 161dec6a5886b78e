"""Learning, for real, on the 5×5 grid of 2-D Gaussians (`toy2d` preset, ~2 min on 2 CPU cores).

The four stages run in process with the preset's own hyperparameters; samples come from each stage's own
sampler. Stage 1's Langevin correction must improve on its generator alone (the same latents) by at least 0.03
in the fraction of samples within 3 standard deviations of a mode centre, covering all 25 modes, and Stage 2's
joint sampling must not be worse than Stage 1.
"""

from __future__ import annotations

import pytest

from hdebm_ray.config import load_config
from hdebm_ray.core.toy_metrics import mode_coverage
from hdebm_ray.data.datasets import toy2d_centres
from hdebm_ray.evaluation.sampling import Sampler
from hdebm_ray.training.runner import run_in_process

N_SAMPLES = 2000


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy2d")
    cfg = load_config("toy2d")
    centres = toy2d_centres(cfg.data.toy2d_mixture)
    results, ckpt = {}, None
    for stage in ("diffusion", "distill", "stage1", "stage2"):
        _, ckpt = run_in_process(cfg, stage, root / stage, init_dir=ckpt)
        samples, starts = Sampler(ckpt).sample_with_start(N_SAMPLES, seed=123)
        results[stage] = mode_coverage(samples, centres, cfg.data.toy2d_std)
        if starts is not None:  # Stage 1 / 2: G(z) alone, the same latents
            results[f"{stage} G(z)"] = mode_coverage(starts, centres, cfg.data.toy2d_std)
    print("toy2d mode coverage:", results)
    return results


def test_stage1_langevin_improves_on_its_generator_and_covers_every_mode(toy_pipeline):
    s1, g = toy_pipeline["stage1"], toy_pipeline["stage1 G(z)"]
    assert s1["modes_covered"] == 25, s1
    assert s1["high_quality_fraction"] >= g["high_quality_fraction"] + 0.03, (s1, g)
    assert s1["high_quality_fraction"] >= 0.85, s1


def test_stage2_is_not_worse_than_stage1(toy_pipeline):
    s1, s2 = toy_pipeline["stage1"], toy_pipeline["stage2"]
    assert s2["modes_covered"] == 25, s2
    assert s2["high_quality_fraction"] >= s1["high_quality_fraction"], (s1, s2)


def test_one_step_distillation_keeps_the_grid(toy_pipeline):
    # Distillation trades a little quality for 16x fewer steps; it must not lose the grid.
    assert toy_pipeline["diffusion"]["modes_covered"] == 25
    assert toy_pipeline["distill"]["modes_covered"] >= 24
    assert toy_pipeline["distill"]["high_quality_fraction"] >= 0.75


@pytest.mark.parametrize("stage", ["mebm", "mjem", "icd"])
def test_baseline_learns_the_grid_beyond_where_its_chains_start(tmp_path, stage):
    # Each baseline with the preset's settings but 600 steps (1000 in the preset: the grid is learned by 600).
    # Its sampler runs SGLD from the stage's chain_init:
    # p0 = N(mu, Sigma) of the data (M-EBM, M-JEM), which puts only ~39% of samples within 3 std of a mode, or
    # U[-1, 1] (Improved CD), ~44%. The learned energy must move them there.
    steps = [f"{stage}.steps=600", f"{stage}.report_every=200", f"{stage}.checkpoint_every=600"]
    cfg = load_config("toy2d", overrides=[f"data.path={tmp_path / 'data'}", *steps])
    _, ckpt = run_in_process(cfg, stage, tmp_path / stage)
    sampler = Sampler(ckpt)
    centres = toy2d_centres(cfg.data.toy2d_mixture)
    # A mode counts as covered with at least 20 of the 2000 samples (a quarter of its fair share), not just one.
    trained = mode_coverage(sampler.sample(N_SAMPLES, seed=123), centres, cfg.data.toy2d_std, min_count=20)
    start = mode_coverage(sampler.impl.init.sample(N_SAMPLES), centres, cfg.data.toy2d_std)
    print(f"toy2d {stage}:", trained, "chain init:", start)
    assert trained["modes_covered"] >= 18, trained
    assert trained["high_quality_fraction"] >= start["high_quality_fraction"] + 0.2, (trained, start)
