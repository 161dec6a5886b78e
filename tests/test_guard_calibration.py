"""The divergence guard calibrated for paper scale, on the cifar10 preset's own energy net and generator (CPU, a
few steps, real digits at 32 px RGB) with H's output scaled up by five orders of magnitude, which nothing in a
real run prevents: the healthy run never trips the guard (where the absolute bounds of earlier releases would
have), while a real divergence (a NaN, a chain that explodes once its drift is unclipped) is rolled back at the
first report tick after it persists. And the gap's running-statistics bound itself: scale-free, blind to one
outlier, tripped by a jump that lasts."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hdebm_ray.config import load_config
from hdebm_ray.io.checkpoint import load_meta
from hdebm_ray.stages import ebm_common
from hdebm_ray.training.guard import GuardStop
from hdebm_ray.training.runner import run_in_process
from hdebm_ray.training.step_guard import StepGuard

SCALE = 1e5  # H's output, times this: an energy whose scale grew as a paper run's can
REPORT_EVERY = 4

# The cifar10 preset on CPU: its energy net (width 512) and generator (width 256, z 128), its Langevin step size,
# temperature and drift clip; a small diffusion model (G2 is not what the guard watches), a few chain steps.
CIFAR_ON_CPU = [
    "data.dataset=digits",
    "data.path=",
    "ray.use_gpu=false",
    "ray.num_workers=1",
    "compute.precision=fp32",
    "compute.compile=none",
    "compute.channels_last=false",
    "compute.adam=auto",
    "compute.tf32=false",
    "network.unet.channels=16",
    "network.unet.channel_mult=[1,2]",
    "network.unet.num_res_blocks=1",
    "network.unet.attn_resolutions=[8]",
    "diffusion.steps=1",
    "diffusion.batch_size=4",
    "diffusion.checkpoint_every=1",
    "diffusion.report_every=1",
    "distill.n0_steps=2",
    "distill.steps_per_stage=1",
    "distill.batch_size=4",
    "distill.eval_batch=4",
    "distill.checkpoint_every=1",
    "distill.report_every=1",
    "stage1.batch_size=4",
    "stage1.bank_size=16",
    "stage1.langevin.steps=4",
    f"stage1.report_every={REPORT_EVERY}",
    "stage1.checkpoint_every=4",
    "guard.gap_warmup_steps=4",  # the gap's z-score is live from step 5 of every attempt
    "eval.actors=0",
    "eval.image_grid=0",
]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_distilled")
    cfg = load_config("cifar10", overrides=CIFAR_ON_CPU)
    _, ckpt = run_in_process(cfg, "diffusion", root / "diffusion")
    _, ckpt = run_in_process(cfg, "distill", root / "distill", init_dir=ckpt)
    return str(ckpt)


@pytest.fixture
def scaled_energy(monkeypatch):
    """H's output times SCALE, through a forward hook: the weights, checkpoints and everything else unchanged."""
    build = ebm_common.build_energy

    def scaled(*args, **kwargs):
        net = build(*args, **kwargs)
        net.register_forward_hook(lambda module, inputs, out: out * SCALE)
        return net

    monkeypatch.setattr(ebm_common, "build_energy", scaled)


def scalars(tb: str, tag: str) -> list[float]:
    acc = EventAccumulator(tb)
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_a_healthy_run_at_a_large_energy_scale_never_trips_the_guard(distilled, scaled_energy, tmp_path):
    cfg = load_config("cifar10", overrides=CIFAR_ON_CPU + ["stage1.steps=12"])
    assert cfg.network.energy.width == 512 and cfg.network.generator.width == 256  # the preset's networks
    _, last = run_in_process(cfg, "stage1", tmp_path / "run", init_dir=distilled, log_dir=str(tmp_path / "tb"))
    meta = load_meta(last)
    assert meta["done"] and meta["step"] == 12 and meta["guard"]["rollbacks"] == []
    tb = str(tmp_path / "tb" / "stage1")
    # the scale really is large: 0.1's absolute bounds (drift norm 1e3, energy gap 1e4) would have stopped it
    assert max(scalars(tb, "Langevin/drift_norm")) > 1e3
    assert max(scalars(tb, "Energy/abs_gap")) > 1e4
    # and what the guard bounds stayed where a healthy chain lives: the clip holds every step to 2.5 (L2)
    assert max(scalars(tb, "Langevin/step_rms")) <= 2.5 / math.sqrt(3 * 32 * 32) + 1e-6
    assert min(scalars(tb, "Langevin/clip_fraction")) == 1.0


def test_a_nan_rolls_back_at_the_first_report_tick(distilled, scaled_energy, tmp_path):
    cfg = load_config("cifar10", overrides=CIFAR_ON_CPU + ["stage1.steps=8", "guard.inject_nan_at_step=6"])
    _, last = run_in_process(cfg, "stage1", tmp_path / "run", init_dir=distilled)
    meta = load_meta(last)
    (rollback,) = meta["guard"]["rollbacks"]
    assert rollback["step"] == 6 and rollback["value"] == "nan" and rollback["to"] == 4
    assert rollback["seen_after"] == 8  # the report tick after it: nothing trained on past one report interval
    assert meta["done"] and meta["step"] == 8


def test_an_exploding_chain_is_stopped_at_the_first_report_tick_after_it_persists(distilled, scaled_energy, tmp_path):
    """Unclipped, the scaled drift throws the chain out of the data range: Langevin/step_rms holds above its bound
    for guard.patience steps; with no rollbacks left the stage stops there, in one line."""
    cfg = load_config(
        "cifar10",
        overrides=CIFAR_ON_CPU + ["stage1.steps=12", "stage1.langevin.drift_clip=0", "guard.max_rollbacks=0"],
    )
    with pytest.raises(GuardStop) as stop:
        run_in_process(cfg, "stage1", tmp_path / "run", init_dir=distilled)
    message = str(stop.value)
    assert "\n" not in message and "Langevin/" in message and "guard.max_rollbacks = 0" in message
    step = int(message.split("diverged at step ")[1].split(":")[0])
    assert step == cfg.guard.patience  # exploding from the first step, flagged once it persisted
    assert not list((tmp_path / "run").glob("checkpoint_*"))  # stopped at the first tick, before any checkpoint

    # the same chain under guard.mode observe: printed and counted, trained through
    observed = cfg.replace(**{"guard.mode": "observe", "stage1.steps": 4})
    _, last = run_in_process(observed, "stage1", tmp_path / "observed", init_dir=distilled)
    meta = load_meta(last)
    assert meta["done"] and meta["guard"]["rollbacks"] == []
    assert meta["metrics"]["Guard/observed_violations"] == 1


def gap_series(guard: StepGuard, gaps, start: int = 0):
    verdicts = []
    for i, gap in enumerate(gaps):
        guard.observe(start + i, {"Energy/gap": torch.tensor(gap)})
        div = guard.poll()
        verdicts.append(None if div is None else div.step)
    return verdicts


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])
def test_the_gap_bound_is_scale_free_ignores_one_outlier_and_trips_on_a_jump_that_lasts(scale):
    cfg = load_config("toy2d", overrides=["guard.gap_warmup_steps=50", "guard.max_gap_z=50", "guard.patience=3"])
    torch.manual_seed(0)
    healthy = (scale * (1.0 + 0.1 * torch.randn(200) + torch.linspace(0, 2, 200))).tolist()  # noise and a drift
    guard = StepGuard(cfg, torch.device("cpu"))
    assert gap_series(guard, healthy) == [None] * 200
    # one wild step proves nothing; a jump by orders of magnitude that lasts trips after guard.patience steps
    assert gap_series(guard, [scale * 1e4] + healthy[-3:], start=200) == [None] * 4
    assert gap_series(guard, [scale * 1e4] * 4, start=204) == [None, None, 206, 207]  # flagged while it lasts
