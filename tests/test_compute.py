"""The ``compute`` section: bf16 Langevin against the Gaussian closed form with a bound derived for bf16, a compiled
Stage 1 step against the eager one, every precision the config accepts training, refused combinations naming the
key, a step without host syncs, and the benchmark's core running with Ray, clean-fid and tqdm absent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hdebm_ray.config import ConfigError, compute_support, load_config
from hdebm_ray.config.runtime import ComputeSection
from hdebm_ray.contracts import WorkerContext
from hdebm_ray.core.compute import Autocast, Compute
from hdebm_ray.core.langevin import hill_coefficients, sample_langevin
from hdebm_ray.networks import build_denoiser, build_energy, build_generator
from hdebm_ray.stages import build_stage
from hdebm_ray.training.runner import local_bank

REPO = Path(__file__).resolve().parents[1]
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest is within 2^-8 relative

TINY_TOY = [
    "ray.num_workers=1",
    "network.mlp.hidden=32",
    "network.mlp.depth=2",
    "network.energy.width=32",
    "network.energy.fourier_features=0",
    "network.generator.width=32",
    "stage1.batch_size=64",
    "stage1.bank_size=256",
    "stage1.langevin.steps=3",
]
TINY_DIGITS = [
    "ray.num_workers=1",
    "network.unet.channels=8",
    "network.unet.attn_resolutions=[]",
    "network.energy.width=8",
    "network.generator.width=8",
    "network.generator.z_dim=8",
    "stage1.batch_size=16",
    "stage1.bank_size=64",
    "stage1.langevin.steps=2",
]


class QuadraticEnergy(nn.Module):
    """E(x) = ½‖(x − μ)/σ‖² through a Linear layer, so that autocast runs it (and its backward) in bf16."""

    def __init__(self, dim: int, mu: float, sigma: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():  # 1/σ = 5 and μ/σ = 2.5 are exact in bf16: only x and the results are rounded
            self.linear.weight.copy_(torch.eye(dim) / sigma)
            self.linear.bias.fill_(-mu / sigma)

    def forward(self, x):
        return 0.5 * self.linear(x).pow(2).sum(dim=1)


def test_bf16_langevin_on_a_gaussian_keeps_the_discretised_moments_within_the_bf16_bound():
    """Hill Langevin on N(μ, σ²) has the exact stationary variance σ² / (1 − ε²/(4σ²)). Under bf16 autocast the
    gradient is g̃ = r(W r(r(x)·W − b)): three roundings, each within u = 2^-8 relative. A relative gradient error
    δ rescales the stationary variance by 1/(1 + δ) and moves the mean by at most the rounding of x itself, so
    the bounds are |Δmean| ≤ u·|μ| + 4 SE and |Δvar / var| ≤ 3u + 4 SE; fp32 must meet the SE bands alone."""
    dim, n, mu, sigma, eps, steps = 16, 4000, 0.5, 0.2, 0.04, 1000
    c, s = hill_coefficients(eps)
    exact_var = sigma**2 / (1 - eps**2 / (4 * sigma**2))
    se_mean, se_var = math.sqrt(exact_var / (n * dim)), exact_var * math.sqrt(2 / (n * dim))
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        energy = Compute(ComputeSection(precision=precision), "cpu").fast(QuadraticEnergy(dim, mu, sigma))
        x = sample_langevin(energy, torch.zeros(n, dim), steps, c, s)
        assert x.dtype == torch.float32  # the chain's state stays fp32 whatever the forward's precision
        u = BF16_UNIT_ROUNDOFF if precision == "bf16" else 0.0
        assert abs(x.mean().item() - mu) <= u * mu + 4 * se_mean, (precision, x.mean().item())
        assert abs(x.var().item() / exact_var - 1) <= 3 * u + 4 * se_var / exact_var, (precision, x.var().item())
    # autocast is really on in what the chain ran through: bf16 differs from fp32, within the derived bound
    probe = torch.rand(64, dim)
    e32 = QuadraticEnergy(dim, mu, sigma)(probe)
    e16 = Compute(ComputeSection(precision="bf16"), "cpu").fast(QuadraticEnergy(dim, mu, sigma))(probe)
    assert e16.dtype == torch.float32 and not torch.equal(e16, e32)
    assert ((e16 - e32).abs() / e32.abs().clamp_min(1e-3)).max() < 6 * BF16_UNIT_ROUNDOFF


def _init_dir(cfg, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_denoiser(cfg).state_dict(), root / "denoiser.pt")
    return root


def _stage1(cfg, init_dir, seed: int = 0):
    torch.manual_seed(seed)
    ctx = WorkerContext()
    ctx.bank = local_bank(cfg, "stage1", snapshot_dir=None)
    stage = build_stage("stage1", cfg, ctx, init_dir)
    stage.on_start(0)
    return stage


def _params_and_grads(stage):
    ps = [*stage.energy.net.parameters(), *stage.hat.g1.parameters()]
    return [p.detach().clone() for p in ps], [p.grad.detach().clone() for p in ps]


def test_a_compiled_stage1_step_gives_the_eager_parameters(tmp_path):
    """Two Stage 1 steps, eager and compiled, same seeds. Adam's first updates are ±lr wherever the gradient is
    pure rounding noise (H's output bias: the CD loss does not depend on it), so elements whose eager gradient
    is below 1e-6 are excluded; every other element must agree to 1e-5."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    runs = {}
    for mode in ("none", "default"):
        cfg = load_config("toy2d", overrides=[*TINY_TOY, f"compute.compile={mode}"])
        stage = _stage1(cfg, _init_dir(cfg, tmp_path / "init"))
        assert isinstance(stage.energy.fast, OptimizedModule) == (mode == "default")
        grads = []
        for step in range(2):
            torch.manual_seed(100 + step)
            stage.train_step(step)
            grads.append(_params_and_grads(stage)[1])
        runs[mode] = (_params_and_grads(stage)[0], grads)
    assert counters["stats"]["unique_graphs"] > 0  # inductor really compiled graphs
    (eager, eager_grads), (compiled, compiled_grads) = runs["none"], runs["default"]
    determined = total = 0
    for g_eager, g_compiled in zip(eager_grads, compiled_grads, strict=True):
        # the gradients themselves, so that a wrong gradient scale (which Adam's ±lr first steps hide) shows
        flat_eager = torch.cat([g.flatten() for g in g_eager])
        flat_compiled = torch.cat([g.flatten() for g in g_compiled])
        assert (flat_compiled - flat_eager).norm() <= 1e-4 * flat_eager.norm()
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        mask = (eager_grads[0][i].abs() > 1e-6) & (eager_grads[1][i].abs() > 1e-6)
        determined, total = determined + int(mask.sum()), total + mask.numel()
        assert float(torch.cat([(a - b)[mask].abs(), torch.zeros(1)]).max()) < 1e-5, i
    assert determined > 0.98 * total  # the exclusion is the rare noise-gradient elements, not the network


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("toy2d", ["compute.precision=fp32", "compute.adam=for_loop"]),
        ("toy2d", ["compute.precision=bf16", "compute.adam=fused"]),
        ("toy2d", ["compute.precision=bf16", "compute.adam=foreach"]),
        ("digits", ["compute.precision=fp32", "compute.channels_last=true", "compute.adam=fused"]),
        ("digits", ["compute.precision=bf16", "compute.channels_last=true"]),
    ],
)
def test_every_precision_the_config_accepts_trains_a_few_stage1_steps(tmp_path, preset, extra):
    cfg = load_config(preset, overrides=[*(TINY_TOY if preset == "toy2d" else TINY_DIGITS), *extra])
    stage = _stage1(cfg, _init_dir(cfg, tmp_path / "init"))
    before = [p.detach().clone() for p in stage.energy.net.parameters()]
    for step in range(3):
        metrics = stage.train_step(step)
    assert all(math.isfinite(float(v)) for v in metrics.values()), metrics
    after = list(stage.energy.net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    if cfg.compute.channels_last:
        conv = next(p for p in stage.energy.net.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stage_name", ["diffusion", "distill", "stage2", "mebm", "mjem", "icd"])
def test_the_other_stages_train_in_bf16_with_channels_last(tmp_path, stage_name):
    """bf16 + NHWC through every other stage's networks (M-JEM's energy returns a tuple with its logits)."""
    cfg = load_config(
        "digits",
        overrides=[
            *TINY_DIGITS, "compute.precision=bf16", "compute.channels_last=true", "distill.n0_steps=2",
            "distill.steps_per_stage=2", "distill.eval_batch=8", "stage2.batch_size=16", "stage2.langevin.steps=2",
            *(f"{b}.{k}" for b in ("mebm", "mjem", "icd")
              for k in ("batch_size=16", "buffer_size=64", "langevin.steps=2")),
            "mjem.classifier_batch_size=16", "icd.kl_samples=8", "icd.entropy_reference=8", "icd.entropy_min_filled=0",
            "diffusion.batch_size=16", "distill.batch_size=16",
        ],
    )  # fmt: skip
    init = tmp_path / "init"
    init.mkdir()
    torch.manual_seed(0)
    for name, build in (("denoiser", build_denoiser), ("generator", build_generator), ("energy", build_energy)):
        torch.save(build(cfg).state_dict(), init / f"{name}.pt")
    ctx = WorkerContext()
    if stage_name in ("mebm", "mjem", "icd"):
        ctx.bank = local_bank(cfg, stage_name, snapshot_dir=None)
    stage = build_stage(stage_name, cfg, ctx, init if stage_name in ("distill", "stage2") else None)
    stage.on_start(0)
    for step in range(2):
        metrics = stage.train_step(step)
    assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), metrics


def test_fp16_with_its_grad_scaler_trains_the_energy(tmp_path):
    """The fp16 path (autocast fp16 + GradScaler) on a CPU, where torch can run it though the config refuses it
    for lack of a GPU: the scaler multiplies the loss, unscales before the layer-wise clip, and H trains."""
    from hdebm_ray.core.energy_trainer import EnergyTrainer

    cfg = load_config("toy2d", overrides=TINY_TOY)
    fp16 = Compute(ComputeSection(precision="fp16"), "cpu", strict=False)
    torch.manual_seed(0)
    trainer = EnergyTrainer(
        build_energy(cfg), WorkerContext(), lr=1e-3, schedule="constant", warmup_steps=0, total_steps=10,
        grad_clip=1.0, temperature=1.0, data_jitter=0.0, mad_k=None, ema_halflife_kimg=0, batch_size=64,
        compute=fp16,
    )  # fmt: skip
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    before = [p.detach().clone() for p in trainer.net.parameters()]
    for _ in range(3):
        metrics = trainer.update(torch.randn(64, 2) * 0.5, torch.randn(64, 2))
    assert math.isfinite(float(metrics["Loss/energy"])) and float(metrics["Opt/grad_norm_energy"]) < 1e4
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters(), strict=True))
    # the training forward runs in fp16, the chains' input gradients in fp32 (no scaler could guard them)
    assert isinstance(trainer.ddp, Autocast) and not isinstance(trainer.fast, Autocast)
    # the loss scale it has found survives a checkpoint
    states = trainer.state_dict()
    fresh = EnergyTrainer(
        build_energy(cfg), WorkerContext(), lr=1e-3, schedule="constant", warmup_steps=0, total_steps=10,
        grad_clip=1.0, temperature=1.0, data_jitter=0.0, mad_k=None, ema_halflife_kimg=0, batch_size=64,
        compute=fp16,
    )  # fmt: skip
    fresh.load_state_dict(states)
    assert "energy_scaler" in states and fresh.scaler.get_scale() == trainer.scaler.get_scale()


def test_refused_combinations_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"'compute\.precision' = 'fp16' needs a GPU"):
        load_config("digits", overrides=["compute.precision=fp16"])
    load_config("cifar10", overrides=["compute.precision=fp16"])  # a GPU preset may
    monkeypatch.setattr(compute_support, "compile_modes", lambda: ("default",))
    with pytest.raises(ConfigError, match=r"'compute\.compile' = 'max-autotune' is not available"):
        load_config("digits", overrides=["compute.compile=max-autotune"])
    monkeypatch.setattr(compute_support, "_cpu_fused_adam", lambda: False)
    with pytest.raises(ConfigError, match=r"'compute\.adam' = 'fused' has no CPU kernel"):
        load_config("digits", overrides=["compute.adam=fused"])
    with pytest.raises(ConfigError, match=r"'compute\.precision' = 'fp64' is not allowed"):
        load_config("digits", overrides=["compute.precision=fp64"])
    cli = [sys.executable, "-m", "hdebm_ray", "train", "--stage", "stage1", "--preset", "digits", "--set"]
    out = subprocess.run([*cli, "compute.precision=fp16"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        "hdebm-ray: error: config key 'compute.precision' = 'fp16' needs a GPU (ray.use_gpu: true); "
        "on CPU use bf16 or fp32"
    ]


def test_a_stage1_step_never_syncs_with_the_host(tmp_path, monkeypatch):
    """Reading a tensor's value (item / float / bool / tolist) is what waits for a GPU: a Stage 1 step (chain,
    H's update, G1's update, bank round trip) must do none of it; the loop reads the metrics once per tick."""
    cfg = load_config("digits", overrides=TINY_DIGITS)
    stage = _stage1(cfg, _init_dir(cfg, tmp_path / "init"))
    stage.train_step(0)

    def refusing(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            # Adam's step counters are host tensors by design (capturable=False): reading them waits for nothing
            if sys._getframe(1).f_code.co_name == "_get_value":
                return original(self, *args, **kwargs)
            raise AssertionError(f"host sync inside a step: Tensor.{name}")

        return read

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refusing(name))
    metrics = stage.train_step(1)
    monkeypatch.undo()
    assert isinstance(metrics["Loss/energy"], torch.Tensor) and math.isfinite(float(metrics["Langevin/drift_norm"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host buffers and CUDA events need a GPU")
def test_pinned_staging_round_trips_the_bank_batches():
    import numpy as np

    from hdebm_ray.core.transfer import HostStaging

    staging = HostStaging(torch.device("cuda"))
    arrays = {"x": np.random.randn(8, 3).astype(np.float32)}
    on_device = staging.to_device(arrays)
    staging.start_to_host({"x": on_device["x"] * 2})
    np.testing.assert_allclose(staging.host_arrays()["x"], arrays["x"] * 2)


def test_the_step_anatomy_benchmark_runs_without_ray_clean_fid_or_tqdm(tmp_path):
    """What the GPU machine has: torch and the working tree, no Ray, clean-fid or tqdm (imports of them fail)."""
    script = f"""
import sys, runpy
for name in ('ray', 'cleanfid', 'tqdm'):
    sys.modules[name] = None  # `import name` fails and find_spec says absent, as on a machine without it
sys.argv = ['step_anatomy.py', '--preset', 'toy2d', '--variants', 'fp32/none', '--steps', '1',
            '--reps', '1', '--skip-scaling', '--out', {str(tmp_path)!r}, '--set', 'stage1.langevin.steps=2',
            '--set', 'stage2.langevin.steps=2', '--set', 'network.mlp.hidden=32']
runpy.run_path({str(REPO / "benchmarks" / "step_anatomy.py")!r}, run_name='__main__')
assert not any(m.split('.')[0] in ('ray', 'cleanfid', 'tqdm') for m, v in sys.modules.items() if v is not None)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "step_anatomy_cpu.json").read_text())
    s1 = result["variants"]["fp32/compile=none"]["stage1"]
    assert s1["ideal_s"] > 0 and s1["step_over_ideal"] > 0 and "scaling" in result
    assert "| step / ideal |" in (tmp_path / "step_anatomy_cpu.md").read_text()


def _compiled_ddp_rank(rank: int, world: int, port: int, init_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    from hdebm_ray.core.ranks import check_replicas_agree

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config("toy2d", overrides=[*TINY_TOY, "ray.num_workers=2", "compute.compile=default"])
    ctx = WorkerContext(rank=rank, world_size=world, wrap_fn=DistributedDataParallel)
    ctx.bank = local_bank(cfg, "stage1", snapshot_dir=None)
    torch.manual_seed(0)  # the same initial weights on both ranks, as Ray Train's prepare_model broadcasts them
    stage = build_stage("stage1", cfg, ctx, init_dir)
    stage.on_start(0)
    if rank:
        stage.fill_bank()  # each rank has its own in-process bank here; rank 0 filled its own
    assert isinstance(stage.energy.ddp, OptimizedModule) and isinstance(stage.g1_ddp, OptimizedModule)
    torch.manual_seed(10 + rank)  # different chains and data per rank: only DDP's all-reduce keeps them equal
    losses = [float(stage.train_step(step)["Loss/energy"]) for step in range(2)]
    for name, module in ctx.replicated.items():
        check_replicas_agree(module, name)  # raises if a compiled DDP forward skipped the gradient all-reduce
    if rank == 0:
        Path(out).write_text(json.dumps(losses))
    dist.destroy_process_group()


def test_compiled_modules_under_ddp_keep_two_gloo_ranks_in_sync(tmp_path):
    """torch.compile around DDP (what a compiled Stage 1 runs under Ray Train): two CPU ranks, different data,
    and after two steps H's and G1's replicas still agree."""
    import torch.multiprocessing as mp

    cfg = load_config("toy2d", overrides=TINY_TOY)
    init = _init_dir(cfg, tmp_path / "init")
    out = tmp_path / "losses.json"
    port = 29000 + (hash(str(tmp_path)) % 1000)
    mp.spawn(_compiled_ddp_rank, args=(2, port, str(init), str(out)), nprocs=2, join=True)
    assert all(math.isfinite(v) for v in json.loads(out.read_text()))


def test_the_sync_free_ema_update_equals_averaged_models_own():
    import copy

    from hdebm_ray.core.optim import ema_model, load_ema, update_ema

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))
    ours, torchs = ema_model(net, halflife_kimg=0.05, batch_size=16), ema_model(net, halflife_kimg=0.05, batch_size=16)
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ours, net)
        torchs.update_parameters(net)
        if step == 1:  # a checkpoint round trip in the middle
            restored = copy.deepcopy(ours)
            load_ema(restored, ours.state_dict())
            ours = restored
    for a, b in zip(ours.parameters(), torchs.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert int(ours.n_averaged) == int(torchs.n_averaged) == 4
