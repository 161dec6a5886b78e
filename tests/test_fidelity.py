"""Fidelity to the papers and their reference code: one test (or more) per defect a line-by-line review found.

Each test fails on the code before its fix: the distillation teacher in training mode, Stage 2's latent gradients
at the old residual, replay-buffer chains written to random slots, M-EBM without its clamps, the MAD filter on a
rank's share of the batch, Improved CD's hard-coded augmentation strengths, evaluation without EMA weights or on
fresh chains only, and the DDP replica check on the baselines only. (Replay-buffer lineages: test_bank.py;
network sizes against the reference architectures: test_networks.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY, small_digits_overrides
from torch import nn

from hdebm_ray.bank.store import SlotStore, snapshot_location
from hdebm_ray.config import load_config
from hdebm_ray.contracts import WorkerContext
from hdebm_ray.core.diffusion import CosineSchedule, teacher_two_steps
from hdebm_ray.core.energy_trainer import EnergyTrainer
from hdebm_ray.core.gaussian_init import fit_gaussian
from hdebm_ray.core.hat import HatGenerator
from hdebm_ray.core.langevin import sample_joint, sample_langevin
from hdebm_ray.data.augment import AugmentOptions, color, rescale
from hdebm_ray.evaluation.fid import FeatureSpace, evaluate_checkpoint
from hdebm_ray.evaluation.sampling import Sampler
from hdebm_ray.io.checkpoint import ema_weights, load_states, save_checkpoint
from hdebm_ray.networks import build_denoiser
from hdebm_ray.stages import build_stage
from hdebm_ray.stages.base import StageBase
from hdebm_ray.training.loop import run_loop
from hdebm_ray.training.runner import local_bank, run_in_process

# -- 1. the distillation teacher is a fixed function ------------------------------------------------------------


def test_distillation_teacher_and_g2_run_without_dropout(tmp_path):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "d") + ["network.unet.dropout=0.3"])
    teacher = build_denoiser(cfg)
    torch.manual_seed(0)
    for p in teacher.parameters():  # a trained-looking net: the zero-initialised output layers would hide dropout
        p.data.normal_(0, 0.05)
    save_checkpoint(tmp_path / "diff", {"denoiser": teacher.state_dict()}, cfg, {"stage": "diffusion", "step": 1})
    stage = build_stage("distill", cfg, WorkerContext(), tmp_path / "diff")
    sched = CosineSchedule(cfg.diffusion.T, cfg.diffusion.cosine_s)
    z = torch.randn(8, 1, 16, 16)
    t, s = torch.full((8,), 128), torch.full((8,), 64)
    first, _ = teacher_two_steps(stage.teacher, sched, z, t, s)
    second, _ = teacher_two_steps(stage.teacher, sched, z, t, s)
    assert torch.equal(first, second)  # the student's target is a function of z_t, not a dropout draw
    assert not stage.teacher.training and stage.student.training
    # the students train without dropout (Salimans & Ho's code), the teacher keeps the UNet's
    assert {m.p for m in stage.student.modules() if isinstance(m, nn.Dropout)} == {cfg.distill.student_dropout}
    stage._finish_substage(cfg.distill.n0_steps // 2)  # the measured student becomes the teacher: both stay put
    assert not stage.teacher.training and stage.student.training
    # G2's denoiser stays in eval mode even when the whole hat generator is put in training mode
    hat = HatGenerator(nn.Identity(), stage.teacher, sched, cfg.diffusion.T_trunc).train()
    assert not hat.denoiser.training


# -- 3. Stage 2 takes the latent gradients at the new residual ---------------------------------------------------


class _Quadratic(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return 0.5 * (x - self.m).pow(2).sum(1)


def test_stage2_latent_gradients_are_taken_at_the_updated_residual():
    # H(x) = ||x - m||^2 / 2 and a linear G(z1, z2) = A z1 + b * z2: one joint step by hand (Eq. 13-15).
    # Noise std eps = 1e-6 with T = 1e-12 gives drift coefficients of 0.5, so the answer is deterministic to 1e-5.
    torch.manual_seed(0)
    d, k = 6, 3
    m, a, b = torch.randn(d), torch.randn(d, k) * 0.5, 0.7
    energy = _Quadratic(m)
    gen = lambda z1, z2: z1 @ a.T + b * z2  # noqa: E731
    z1, z2 = torch.randn(4, k), torch.randn(4, d)
    eps, temp = 1e-6, 1e-12
    y, z1_new, z2_new, _ = sample_joint(
        energy, gen, z1, z2, steps=1, y_step_size=eps, z1_step_size=eps, z2_step_size=eps,
        temperature=temp, drift_clip=0.0, y_steps_per_latent_step=1,
    )  # fmt: skip
    c = eps**2 / (2 * temp)  # the drift coefficient on grad H (U = H / T)
    y_1 = -c * (gen(z1, z2) - m)  # Y_1 from Y_0 = 0
    residual = gen(z1, z2) + y_1 - m  # grad H at G(z_0) + Y_1
    assert torch.allclose(y, y_1, atol=1e-4)
    assert torch.allclose(z1_new, z1 - c * residual @ a, atol=1e-4)
    assert torch.allclose(z2_new, z2 - c * b * residual, atol=1e-4)
    stale = gen(z1, z2) - m  # at Y_0: what the sampler used to do
    assert not torch.allclose(z1_new, z1 - c * stale @ a, atol=1e-2)


# -- 2., 6., 7. the baselines' buffer, its protocol and M-EBM's clamps --------------------------------------------


def test_mebm_defaults_follow_the_official_code_and_the_clamps_bound_each_step():
    cfg = load_config()
    for name in ("mebm", "mjem"):
        s = getattr(cfg, name)
        assert (s.langevin.grad_clamp, s.langevin.clamp, s.p0_cov_jitter, s.p0_clamp) == (1.0, True, 1e-4, True)
        assert (s.buffer_write, s.buffer_prefill, s.eval_protocol) == ("in_place", True, "buffer")
    assert (cfg.icd.buffer_write, cfg.icd.buffer_prefill, cfg.icd.eval_protocol) == ("reservoir", False, "fresh")
    # E(x) = 1000 * sum(x): every gradient element is 1000, clamped to 1, so alpha = 0.3 moves each pixel by 0.3
    x0 = torch.full((5, 1, 4, 4), 0.5)
    out = sample_langevin(lambda x: 1000 * x.flatten(1).sum(1), x0, 1, 0.3, 0.0, grad_clamp=1.0)
    assert torch.allclose(out, x0 - 0.3)
    chained = sample_langevin(lambda x: 1000 * x.flatten(1).sum(1), x0, 10, 0.3, 0.0, bounds=(-1, 1), grad_clamp=1)
    assert torch.allclose(chained, torch.full_like(x0, -1.0))  # chains clamped to the data range
    # Sigma + 1e-4 I: a constant pixel still gets variance 1e-4
    data = torch.randn(500, 3)
    data[:, 1] = 0.2
    p0 = fit_gaussian(data, cov_jitter=1e-4)
    assert p0.covariance[1, 1] >= 1e-4 and abs(float(p0.covariance[1, 1]) - 1e-4) < 1e-6


@pytest.fixture(scope="module")
def mebm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mebm")
    over = small_digits_overrides(str(tmp), "m") + TINY + ["mebm.reinit_prob=0", "eval.features=raw"]
    cfg = load_config("digits", overrides=over + [f"data.path={tmp / 'data'}"])
    stage, ckpt = run_in_process(cfg, "mebm", tmp / "mebm")
    return cfg, stage, ckpt


def test_mebm_buffer_is_prefilled_and_keeps_its_persistent_chains(mebm_run):
    cfg, stage, _ = mebm_run
    stats = stage.bank.stats()
    # filled with N p0 draws before the first step; with rho = 0 every one of the N chains survives
    assert stats["pushed"] == cfg.mebm.buffer_size and stats["filled_fraction"] == 1.0
    assert stats["distinct_lineages"] == cfg.mebm.buffer_size
    writes = stage.bank.service.core.store.writes
    assert writes.sum() == cfg.mebm.buffer_size + cfg.mebm.steps * cfg.mebm.batch_size
    # and the buffer's counters reach TensorBoard at every report tick
    assert stage.tick_metrics(cfg.mebm.steps)["Bank/distinct_lineages"] == cfg.mebm.buffer_size


def test_baseline_fid_protocols_buffer_and_fresh(mebm_run, tmp_path):
    cfg, _, ckpt = mebm_run
    location = snapshot_location(ckpt, cfg.mebm.steps)
    snapshot = SlotStore.load(location)[0].arrays["x"]
    buffer = Sampler(ckpt)  # the default for M-EBM: the paper's buffer FID
    assert buffer.protocol == "buffer" and buffer.weights == "none" and buffer.max_samples == cfg.mebm.buffer_size
    x, starts = buffer.sample_with_start(cfg.mebm.buffer_size)
    flat = {tuple(np.round(r, 5)) for r in snapshot.reshape(len(snapshot), -1)}
    assert {tuple(np.round(r, 5)) for r in x.flatten(1).numpy()} == flat  # exactly the buffer's chains, each once
    fresh = Sampler(ckpt, protocol="fresh")
    assert fresh.protocol == "fresh" and not torch.allclose(fresh.sample(8), x[:8])
    space = FeatureSpace(cfg)
    result = evaluate_checkpoint(ckpt, space, 1000)
    assert (result["protocol"], result["weights"], result["num_samples"]) == ("buffer", "none", cfg.mebm.buffer_size)
    assert result["default_sampler"]
    fresh_result = evaluate_checkpoint(ckpt, space, 16, protocol="fresh")
    assert (fresh_result["protocol"], fresh_result["weights"], fresh_result["default_sampler"]) == (
        "fresh",
        "raw",
        False,
    )
    moved = tmp_path / "elsewhere" / "checkpoint_x"  # a checkpoint away from its run has no snapshot beside it
    moved.parent.mkdir()
    import shutil

    shutil.copytree(ckpt, moved)
    with pytest.raises(FileNotFoundError, match="no replay buffer snapshot.*--protocol fresh"):
        Sampler(moved)
    assert Sampler(moved, protocol="fresh").protocol == "fresh"


# -- 5. evaluation with EMA weights; every checkpoint sampleable both ways ---------------------------------------


def test_every_hdebm_checkpoint_samples_with_raw_and_ema_weights(tmp_path):
    over = small_digits_overrides(str(tmp_path), "e") + TINY + ["eval.features=raw"]
    cfg = load_config("digits", overrides=over)
    ckpt, space = None, FeatureSpace(cfg)
    for stage in ("diffusion", "distill", "stage1", "stage2"):
        _, ckpt = run_in_process(cfg, stage, tmp_path / stage, init_dir=ckpt)
        if stage == "distill":
            with pytest.raises(FileNotFoundError, match="no EMA weights"):
                Sampler(ckpt, use_ema=True)
            assert Sampler(ckpt).weights == "raw"
        if stage == "stage1":  # Stage 2 starts from the weights Stage 1's samples use: its EMA, unless told not to
            stage1_ema = ema_weights(ckpt, ["energy", "generator"])
            stage1_raw = load_states(ckpt, ["energy", "generator"])
            for start_from_ema, expected in ((True, stage1_ema), (False, stage1_raw)):
                s2_cfg = cfg.replace(**{"stage2.start_from_ema": start_from_ema})
                s2 = build_stage("stage2", s2_cfg, WorkerContext(), ckpt)
                for net, name in ((s2.energy.net, "energy"), (s2.hat.g1, "generator")):
                    assert all(torch.equal(v, expected[name][k]) for k, v in net.state_dict().items())
            assert not torch.equal(stage1_ema["energy"]["head.weight"], stage1_raw["energy"]["head.weight"])
    raw, ema = Sampler(ckpt, use_ema=False), Sampler(ckpt, use_ema=True)  # Stage 2: was a crash
    assert (raw.weights, ema.weights, Sampler(ckpt).weights) == ("raw", "ema", "ema")  # eval.use_ema: stage2
    assert not torch.allclose(raw.sample(8, seed=1), ema.sample(8, seed=1))
    result = evaluate_checkpoint(ckpt, space, 16)
    assert result["weights"] == "ema" and result["protocol"] == "fresh"
    assert evaluate_checkpoint(ckpt, space, 16, use_ema=False)["weights"] == "raw"


# -- 8. the MAD filter's statistics over the global batch --------------------------------------------------------


class _Identity(nn.Module):
    """E(x) = w * x[:, 0]: energies chosen by the test."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * x[:, 0]


def _mad_rank(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # rank 0: 16 data energies near 0; rank 1: 8 near 0 and 8 at -10. Locally rank 1's median is -5 and its
        # MAD 5 (nothing below -35); over the global batch the median is 0 and the MAD ~0.01, so the 8 go.
        e = 0.01 * torch.arange(16.0) if rank == 0 else torch.cat([torch.full((8,), -10.0), 0.01 * torch.arange(8.0)])
        trainer = EnergyTrainer(
            _Identity(), WorkerContext(rank=rank, world_size=world), lr=1e-3, schedule="constant", warmup_steps=0,
            total_steps=1, grad_clip=0.0, temperature=1.0, data_jitter=0.0, mad_k=6.0, ema_halflife_kimg=0,
            batch_size=32,
        )  # fmt: skip
        metrics = trainer.update(e[:, None], torch.zeros(16, 1))
        results.put((rank, metrics["Energy/mad_dropped"]))
    finally:
        dist.destroy_process_group()


def _spawn(target, tmp_path, *args):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, str(tmp_path / "init"), results, *args)) for r in range(2)]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return outcome


def test_mad_filter_uses_the_median_and_mad_of_the_global_batch(tmp_path):
    assert _spawn(_mad_rank, tmp_path) == {0: 0, 1: 8}


def test_global_mad_filter_averages_over_the_kept_global_batch_even_when_a_share_is_all_dropped():
    from hdebm_ray.core.losses import ebm_loss

    near_zero = 0.01 * torch.arange(12.0)
    outliers = torch.full((4,), -10.0)
    batch = torch.cat([outliers, near_zero])  # 4 ranks of 4: this rank holds the 4 outliers
    loss, dropped = ebm_loss(outliers.clone().requires_grad_(True), torch.zeros(4), 1.0, 6.0, batch)
    assert dropped == 4 and torch.isfinite(loss) and float(loss) == 0.0  # nothing kept here: adds 0, not NaN
    # a rank's share weighted by world size / global kept count: the ranks' mean is the kept global mean
    shares = [ebm_loss(near_zero[i : i + 4], torch.zeros(4), 1.0, 6.0, batch)[0] for i in (0, 4, 8)]
    assert math.isclose(float(sum(shares) / 4), float(near_zero.mean()), rel_tol=1e-6)


# -- 9. Improved CD's augmentation strengths are the code's and config keys ------------------------------------


def test_icd_augmentation_strengths_follow_its_code_and_are_honoured():
    s = load_config().icd
    assert s.augment == ("rescale", "flip", "color")
    assert (tuple(s.augment_crop_area), s.augment_color_strength, s.augment_hue) == ((0.08, 1.0), 0.8, 0.4)
    assert (s.augment_color_prob, s.augment_grayscale_prob) == (0.8, 0.2)
    # A horizontal ramp through a square crop of area a, resized back: a zoom by 1/sqrt(a), so the ramp's slope
    # shrinks to sqrt(a), as torchvision's RandomResizedCrop would give (no longer a fixed 70-100% window).
    torch.manual_seed(0)
    ramp = torch.linspace(-1, 1, 64).expand(16, 1, 64, 64).clone()
    for area in (0.08, 0.5):
        out = rescale(ramp, AugmentOptions(crop_area=(area, area), crop_ratio=(1.0, 1.0)))
        slope = (out[..., 40] - out[..., 24]).mean() / (ramp[..., 40] - ramp[..., 24]).mean()
        assert abs(float(slope) - math.sqrt(area)) < 0.02 * math.sqrt(area), (area, slope)
    rgb = torch.rand(200, 3, 8, 8) * 2 - 1
    grey = color(rgb, AugmentOptions(color_prob=0.0, grayscale_prob=1.0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    kept = color(rgb, AugmentOptions(color_prob=0.0, grayscale_prob=0.0))
    assert torch.allclose(kept, rgb, atol=1e-6)


# -- 10. the DDP replica check at every checkpoint of every stage ------------------------------------------------


class _DriftingStage(StageBase):
    """A stage whose trained module differs between ranks (as if a gradient had bypassed DDP's all-reduce)."""

    name, total_steps, images_per_step, report_every, checkpoint_every = "diffusion", 2, 1, 1, 2

    def __init__(self, rank: int, world: int):
        self.ctx = WorkerContext(rank=rank, world_size=world)
        torch.manual_seed(rank)
        self.ctx.wrap(nn.Linear(3, 2), "denoiser")

    def train_step(self, step):
        return {}


def _replica_rank(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run_loop(_DriftingStage(rank, world), 0, lambda *a: None)
        results.put((rank, "finished"))
    except RuntimeError as e:
        results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_replica_check_runs_at_the_checkpoints_of_every_stage(tmp_path):
    outcome = _spawn(_replica_rank, tmp_path)
    assert all("diffusion's denoiser differ" in msg for msg in outcome.values()), outcome


@pytest.mark.parametrize(
    "stage, modules",
    [("stage1", {"energy", "generator"}), ("mebm", {"energy"}), ("icd", {"energy"}), ("diffusion", {"denoiser"})],
)
def test_every_stage_registers_what_it_trains_for_the_replica_check(tmp_path, stage, modules):
    cfg = load_config("digits", overrides=small_digits_overrides(str(tmp_path), "r") + TINY)
    ctx, init = WorkerContext(), None
    if stage in ("stage1", "mebm", "icd"):
        ctx.bank = local_bank(cfg, stage, None)
    if stage == "stage1":
        denoiser = build_denoiser(cfg)
        save_checkpoint(tmp_path / "k", {"denoiser": denoiser.state_dict()}, cfg, {"stage": "distill", "step": 1})
        init = tmp_path / "k"
    build_stage(stage, cfg, ctx, init)
    assert set(ctx.replicated) == modules
