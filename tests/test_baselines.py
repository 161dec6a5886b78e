"""The baselines' pieces against known answers: augmentations, M-JEM's two-headed network, Improved CD's frozen
scorer and KL step, and M-JEM's classifier learning the digits for real (in process, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hdebm_ray.config import ConfigError, check_stage, load_config
from hdebm_ray.contracts import WorkerContext
from hdebm_ray.core.langevin import langevin_step_with_graph
from hdebm_ray.data.augment import AugmentOptions, augment, blur, color, crop, flip, rescale
from hdebm_ray.networks import build_energy
from hdebm_ray.stages import build_stage
from hdebm_ray.stages.icd import detached
from hdebm_ray.training.runner import local_bank


def test_flip_mirrors_about_half_of_the_batch_exactly():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 8, 8) * 2 - 1
    out = flip(x)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    unchanged = (out == x).flatten(1).all(1)
    assert bool((mirrored | unchanged).all())
    assert 150 < int(mirrored.sum()) < 250  # Binomial(400, 0.5): mean 200, sd 10


def test_crop_shifts_each_image_by_whole_pixels():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0  # one bright pixel, far from the border
    out = crop(x)
    peaks = out.flatten(1).argmax(1)
    rows, cols = peaks // 16 - 8, peaks % 16 - 8
    assert torch.allclose(out.flatten(1).max(1).values, torch.ones(64))  # moved, not blurred
    assert rows.abs().max() <= 2 and cols.abs().max() <= 2 and (rows != 0).any() and (cols != 0).any()


def test_rescale_zooms_in_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.zeros(32, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0  # a 4x4 square in the centre: a zoom-in makes it larger, never smaller
    out = rescale(x, AugmentOptions(crop_area=(0.49, 1.0), crop_ratio=(1.0, 1.0)))  # windows of 70-100% of the side
    assert out.shape == x.shape
    assert bool(((out > 0.5).flatten(1).sum(1) >= 16).all())


def test_blur_keeps_flat_images_and_smooths_edges():
    flat = torch.full((8, 3, 16, 16), 0.3)
    assert torch.allclose(blur(flat), flat, atol=1e-6)
    torch.manual_seed(0)
    checker = (torch.arange(16).reshape(1, 1, 1, 16) + torch.arange(16).reshape(1, 1, 16, 1)) % 2 * 2.0 - 1
    out = blur(checker.expand(200, 1, 16, 16).clone())
    contrast = out.flatten(1).std(1)
    assert (contrast < 0.5).float().mean() > 0.3  # about half get a σ ≥ 0.1 blur that flattens the checkerboard
    assert (contrast > 0.99).float().mean() > 0.3  # the rest are (nearly) unchanged


def test_color_draws_per_image_and_stays_in_range():
    torch.manual_seed(0)
    x = (torch.rand(1, 3, 8, 8) * 2 - 1).expand(64, 3, 8, 8).clone()
    out = color(x)
    assert out.min() >= -1 and out.max() <= 1
    distinct = {round(v, 4) for v in out.mean(dim=(1, 2, 3)).tolist()}
    assert len(distinct) > 40  # brightness / contrast / saturation drawn per image, not per batch


def test_jitter_adds_noise_of_the_configured_std():
    torch.manual_seed(0)
    x = torch.zeros(20000, 2)
    assert abs(augment(x, ("jitter",), AugmentOptions(jitter_std=0.05)).std().item() - 0.05) < 0.002


def test_image_augments_on_toy2d_are_refused_naming_the_key(tmp_path):
    cfg = load_config("toy2d", overrides=["icd.augment=[color]"])
    with pytest.raises(ConfigError, match="icd.augment.*'color'.*toy2d"):
        check_stage(cfg, "icd")
    check_stage(cfg, "mebm")  # only the stage that runs is held to it
    with pytest.raises(ConfigError, match="icd.augment.*'color'.*toy2d"):
        _tiny_stage("icd", tmp_path, ["icd.augment=[color]"])
    with pytest.raises(ConfigError, match="mjem.classifier_batch_size"):
        load_config("digits", overrides=["mjem.classifier_batch_size=5"])


@pytest.mark.parametrize("preset", ["digits", "toy2d"])
def test_mjem_network_has_an_energy_head_and_a_classifier_on_one_trunk(preset):
    cfg = load_config(preset)
    net = build_energy(cfg, num_classes=10)
    x = torch.randn(4, 2) if preset == "toy2d" else torch.randn(4, 1, 16, 16)
    energy, logits = net(x, with_logits=True)
    assert energy.shape == (4,) and logits.shape == (4, 10)
    assert torch.allclose(net(x), energy)  # samplers see the energy head alone
    # Every parameter is used by the joint loss (DDP would refuse an unused one, e.g. the trunk's own head).
    (energy.sum() + logits.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_icd_scorer_is_frozen_and_theta_learns_through_the_sampler():
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.SiLU(), nn.Linear(16, 1), nn.Flatten(0))
    x = torch.randn(8, 3, 2, 2)
    # Scoring a plain (detached) sample: nothing reaches θ, not even through the scorer's own weights.
    assert not detached(energy)(x).mean().requires_grad
    x_hat = langevin_step_with_graph(energy, x, drift_coef=0.5, noise_std=0.0)
    detached(energy)(x_hat).mean().backward()
    assert energy[1].weight.grad.abs().sum() > 0  # θ shapes ∇_x E, so the sampler carries a gradient


def _tiny_stage(name: str, tmp_path, extra=()):
    cfg = load_config(
        "toy2d",
        overrides=[f"data.path={tmp_path}", f"{name}.batch_size=32", f"{name}.buffer_size=64", *extra],
    )
    ctx = WorkerContext()
    ctx.bank = local_bank(cfg, name, None)
    return build_stage(name, cfg, ctx)


def test_icd_step_adds_the_kl_term_and_its_entropy_once_the_buffer_fills(tmp_path):
    torch.manual_seed(0)
    stage = _tiny_stage("icd", tmp_path, ["icd.entropy_min_filled=64", "icd.kl_samples=16", "icd.entropy_reference=20"])
    stage.on_start(0)
    first = stage.train_step(0)  # an empty buffer: L_KL is the frozen energy of x̂ alone
    assert "Loss/kl" in first and "Loss/nn_entropy" not in first  # not measured yet: absent, never NaN
    stage.train_step(1)
    later = stage.train_step(2)  # 64 chains pushed: the entropy against 20 buffer samples joins
    # In 2-D, 16 chains vs 20 reference points: NN distances well below 1, so log NN < 0.
    assert -8 < later["Loss/nn_entropy"] < 0
    assert math.isfinite(later["Loss/kl"])


def test_mjem_classifier_learns_digits_far_above_chance(tmp_path):
    from hdebm_ray.stages.mjem import classifier_accuracy

    cfg = load_config(
        "digits",
        overrides=[
            f"data.path={tmp_path}",
            "ray.num_workers=1",
            "mjem.steps=250",  # the preset's settings, a quarter of its steps and half its batches
            "mjem.batch_size=32",
            "mjem.classifier_batch_size=64",
        ],
    )
    torch.manual_seed(0)
    ctx = WorkerContext()
    ctx.bank = local_bank(cfg, "mjem", None)
    stage = build_stage("mjem", cfg, ctx)
    before = classifier_accuracy(stage.energy.net, cfg)
    stage.on_start(0)
    for step in range(cfg.mjem.steps):
        stage.train_step(step)
    after = classifier_accuracy(stage.energy.net, cfg)
    print(f"M-JEM digits accuracy: {before:.3f} -> {after:.3f}")
    assert before < 0.25 and after > 0.6  # chance is 0.1


def _replica_check(rank: int, world: int, init_file: str, same: bool, results) -> None:
    import torch.distributed as dist

    from hdebm_ray.core.ranks import check_replicas_agree

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0 if same else rank)
    try:
        check_replicas_agree(nn.Linear(4, 3), "the test net")
        results.put((rank, "agree"))
    except RuntimeError as e:
        results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_replica_check_catches_ranks_whose_weights_drifted(tmp_path, same):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=_replica_check, args=(r, 2, init_file, same, results)) for r in range(2)]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    if same:
        assert outcome == {0: "agree", 1: "agree"}
    else:
        assert all("differ" in msg for msg in outcome.values()), outcome
