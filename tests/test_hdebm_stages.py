"""HDEBM Stage 1 / Stage 2 in-process: the stages run, snapshot the bank with each checkpoint, resume with the
bank of the restored step, and the sampler of every stage produces images in range."""

from __future__ import annotations

import torch
from helpers import TINY, small_digits_overrides

from hdebm_ray.bank import list_snapshots
from hdebm_ray.checkpoint import load_meta
from hdebm_ray.config import load_config
from hdebm_ray.enfe import measure_enfe
from hdebm_ray.images import save_grid
from hdebm_ray.runner import run_in_process
from hdebm_ray.sampling import Sampler


def test_all_stages_in_process_with_bank_snapshots_and_samplers(tmp_path):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "tiny") + TINY)
    ckpt = None
    for stage in ("diffusion", "distill", "stage1", "stage2"):
        _, ckpt = run_in_process(cfg, stage, tmp_path / stage, init_dir=ckpt)
        assert load_meta(ckpt)["done"]
        sampler = Sampler(ckpt)
        x = sampler.sample(8)
        assert x.shape == (8, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
        assert save_grid(x, tmp_path / f"{stage}.png").stat().st_size > 0
        if stage == "stage1":
            # a snapshot tagged with each checkpoint's step
            assert set(list_snapshots(str(tmp_path / "stage1" / "bank"))) == {2, 4}


def test_stage1_resume_restores_the_bank_of_the_restored_step(tmp_path):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "res") + TINY)
    _, ck = run_in_process(cfg, "diffusion", tmp_path / "d")
    _, ck = run_in_process(cfg, "distill", tmp_path / "k", init_dir=ck)
    run_in_process(cfg.replace(**{"stage1.steps": 2}), "stage1", tmp_path / "s1", init_dir=ck)
    stage, last = run_in_process(cfg, "stage1", tmp_path / "s1", init_dir=ck)
    assert load_meta(last)["resumed_from_step"] == 2
    assert stage.summary()["bank_restores"] == [{"checkpoint_step": 2, "bank_step": 2}]


def test_enfe_of_an_n_step_diffusion_sampler_is_about_n(tmp_path):
    # The diffusion stage's sampler is n DDIM steps of the same network the 1000-step reference runs: ENFE ≈ n
    # (plus the data fetch and noising it also does). A known answer for the measurement, loose for timing noise.
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "enfe") + TINY + ["distill.n0_steps=8"])
    _, ckpt = run_in_process(cfg, "diffusion", tmp_path / "d")
    result = measure_enfe(ckpt, batches=5, batch_size=32, diffusion_batches=2, diffusion_steps_timed=50)
    assert result["diffusion_steps"] == 1000 and result["stage"] == "diffusion"
    assert 4 < result["enfe"] < 24, result
