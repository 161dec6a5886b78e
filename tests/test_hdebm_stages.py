"""HDEBM Stage 1 / Stage 2 in-process: the stages run, snapshot the bank with each checkpoint, resume with the
bank of the restored step, and the sampler of every stage produces images in range."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, small_digits_overrides

from hdebm_ray.bank.store import list_snapshots
from hdebm_ray.cli.main import main as cli_main
from hdebm_ray.config import ConfigError, load_config
from hdebm_ray.evaluation.enfe import measure_enfe
from hdebm_ray.evaluation.images import save_grid
from hdebm_ray.evaluation.ood import auroc, energies, ood_auroc, source_images
from hdebm_ray.evaluation.sampling import Sampler
from hdebm_ray.io.checkpoint import load_meta
from hdebm_ray.training.runner import run_in_process


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
        if stage in ("stage1", "stage2"):  # the OOD command works on any EBM checkpoint
            assert cli_main(["ood", "--checkpoint", str(ckpt), "--out", "uniform", "--n", "64"]) == 0
            result = ood_auroc(ckpt, None, "constant", n=64)
            assert result["in"] == "digits" and result["num_out"] == 64 and 0 <= result["auroc"] <= 1


def test_stage1_resume_restores_the_bank_of_the_restored_step(tmp_path):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "res") + TINY)
    _, ck = run_in_process(cfg, "diffusion", tmp_path / "d")
    _, ck = run_in_process(cfg, "distill", tmp_path / "k", init_dir=ck)
    run_in_process(cfg.replace(**{"stage1.steps": 2}), "stage1", tmp_path / "s1", init_dir=ck)
    stage, last = run_in_process(cfg, "stage1", tmp_path / "s1", init_dir=ck)
    assert load_meta(last)["resumed_from_step"] == 2
    assert stage.summary()["bank_restores"] == [{"checkpoint_step": 2, "bank_step": 2}]


def test_stage2_samples_at_the_step_size_its_stage1_trained_h_with(tmp_path, capsys):
    """H learned its short-run chain at Stage 1's epsilon: after a guard rollback in Stage 1, or where a sweep chose
    Stage 1's epsilon, Stage 2's chains (training, checkpoint config, sampler) run at step sizes scaled to it;
    Stage 2's learning rate is its own."""
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "inh") + TINY)
    _, ck = run_in_process(cfg, "diffusion", tmp_path / "d")
    _, ck = run_in_process(cfg, "distill", tmp_path / "k", init_dir=ck)
    _, s1 = run_in_process(cfg.replace(**{"guard.inject_nan_at_step": 3}), "stage1", tmp_path / "s1", init_dir=ck)
    assert len(load_meta(s1)["guard"]["rollbacks"]) == 1
    stage, s2 = run_in_process(cfg, "stage2", tmp_path / "s2", init_dir=s1)
    assert "Stage 2's step sizes x 0.5 (stage2.follow_stage1_step_size)" in capsys.readouterr().out
    for key in ("y_step_size", "z1_step_size", "z2_step_size"):
        want = getattr(cfg.stage2.langevin, key) * cfg.guard.backoff
        assert getattr(stage.cfg.stage2.langevin, key) == pytest.approx(want)
        assert getattr(Sampler(s2).cfg.stage2.langevin, key) == pytest.approx(want)  # what its samples run at
    assert stage.cfg.stage2.lr == cfg.stage2.lr and not load_meta(s2)["guard"]["rollbacks"]
    off = cfg.replace(**{"stage2.follow_stage1_step_size": False})
    stage, _ = run_in_process(off, "stage2", tmp_path / "s2_off", init_dir=s1)
    assert stage.cfg.stage2.langevin.y_step_size == cfg.stage2.langevin.y_step_size
    # a Stage 1 run at three times the config's epsilon (a sweep's choice); a plain one leaves Stage 2 as it is
    swept = cfg.replace(**{"stage1.langevin.step_size": 3 * cfg.stage1.langevin.step_size})
    _, s1_swept = run_in_process(swept, "stage1", tmp_path / "s1_swept", init_dir=ck)
    stage, _ = run_in_process(cfg, "stage2", tmp_path / "s2_swept", init_dir=s1_swept)
    assert stage.cfg.stage2.langevin.z1_step_size == pytest.approx(3 * cfg.stage2.langevin.z1_step_size)
    stage, _ = run_in_process(swept, "stage2", tmp_path / "s2_plain", init_dir=s1_swept)
    assert stage.cfg.stage2 == swept.stage2


def test_enfe_of_an_n_step_diffusion_sampler_is_n_in_network_calls(tmp_path):
    # The diffusion stage's sampler is n DDIM steps of the same network the 1000-step reference runs. Measured in
    # network calls instead of seconds (no timing in tests), its ENFE is exactly n.
    # A baseline has no denoiser: its S-step SGLD sampler, timed against a reference checkpoint's, has ENFE S.
    from hdebm_ray.networks.sngan import ResNetEnergy
    from hdebm_ray.networks.unet import UNet

    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(1) if isinstance(module, (UNet, ResNetEnergy)) else None
    )

    def count_calls(fn, device):
        before = len(calls)
        fn()
        return float(len(calls) - before)

    try:
        overrides = small_digits_overrides(str(tmp_path), "enfe") + TINY + ["distill.n0_steps=8"]
        _, ckpt = run_in_process(load_config("digits", overrides=overrides), "diffusion", tmp_path / "d")
        result = measure_enfe(ckpt, batches=2, diffusion_batches=1, diffusion_steps_timed=50, timer=count_calls)
        cfg = load_config("digits", overrides=overrides + [f"data.path={tmp_path}", "mebm.sample_steps=6"])
        _, mebm = run_in_process(cfg, "mebm", tmp_path / "m")
        with pytest.raises(ConfigError, match="--reference"):
            measure_enfe(mebm, batches=1)
        baseline = measure_enfe(
            mebm, batches=2, diffusion_batches=1, diffusion_steps_timed=50, timer=count_calls, reference=ckpt
        )
    finally:
        hook.remove()
    assert result["diffusion_steps"] == 1000 and result["diffusion_batch_s"] == 1000.0
    assert result["sample_batch_s"] == 8.0 and result["enfe"] == 8.0
    assert baseline["stage"] == "mebm" and baseline["enfe"] == 6.0


def test_ood_auroc_of_a_known_energy():
    # E(x) = squared distance to the mean digit: digits sit close to it, uniform noise far away.
    cfg = load_config("digits")
    digits = source_images("digits", cfg, 500)
    mean = digits.mean(0, keepdim=True)

    def energy(x):
        return (x - mean).pow(2).flatten(1).sum(1)

    e_in = energies(energy, digits, 128, "cpu")
    e_out = energies(energy, source_images("uniform", cfg, 500), 128, "cpu")
    assert auroc(e_in, e_out) > 0.99
    assert auroc(e_out, e_in) < 0.01  # swapping the roles flips the score
    assert abs(auroc(e_in[:250], e_in[250:]) - 0.5) < 0.1  # in vs in: chance
