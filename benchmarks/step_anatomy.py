"""Benchmark: the anatomy of a training step on one device, pure PyTorch (no Ray, no clean-fid needed).

For a Stage 1 step: one forward + backward-to-input of H, one Langevin step (the K-step chain on Y / K), the
whole step, and its ideal = the G pass + the K Langevin steps + H's update + G1's update, each timed alone; printed as
step / ideal and Langevin step / fwd-bwd. The same for a Stage 2 step (ideal: the joint chain + H's update) and a
diffusion training step (ideal: the loss's forward + backward + the optimiser step). Every variant of
``--variants`` (precision/compile pairs) runs, and on CPU 1 vs 2 gloo workers (scaling efficiency at the same global
batch; each rank keeps its own in-process bank here, the bank actor's share is in stage1_step.py).

    PYTHONPATH=. python benchmarks/step_anatomy.py                       # digits on CPU, 1 thread per worker
    PYTHONPATH=. python benchmarks/step_anatomy.py --preset cifar10 --device cuda \
        --variants fp32/none,bf16/none,bf16/default                        # the paper config on a GPU

The cifar10 run uses the paper's Stage 1 batch 128 and K = 50 on one device, on noise images of CIFAR-10's size
(a step costs the same on any pixels; the GPU machine is offline). Results go to
``<out>/step_anatomy_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anatomy_report import goals_lines, markdown  # noqa: E402

from hdebm_ray.config import load_config  # noqa: E402
from hdebm_ray.contracts import WorkerContext  # noqa: E402
from hdebm_ray.core.diffusion import diffusion_loss  # noqa: E402
from hdebm_ray.core.langevin import energy_grad, frozen, sample_joint, sample_residual  # noqa: E402
from hdebm_ray.networks import build_denoiser, build_energy, build_generator  # noqa: E402
from hdebm_ray.stages import build_stage  # noqa: E402
from hdebm_ray.stages.hdebm_common import latents  # noqa: E402
from hdebm_ray.stages.hdebm_stage1 import sample_stage1  # noqa: E402
from hdebm_ray.stages.hdebm_stage2 import joint_sampler_kwargs  # noqa: E402
from hdebm_ray.training.runner import local_bank  # noqa: E402


class Timer:
    """Median wall time of a callable on one device (CUDA work is waited for), after warm-up calls."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, reps: int | None = None) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps or self.reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def rounds(self, parts: dict, reps: dict | None = None) -> dict[str, float]:
        """Median time of each part, measured interleaved (part by part, round by round) so that the machine's
        slow and fast phases fall on every part alike and their ratios stay meaningful."""
        reps = reps or {}
        for fn in parts.values():
            for _ in range(self.warmup):
                fn()
        times = {k: [] for k in parts}
        for r in range(max(reps.get(k, self.reps) for k in parts)):
            for k, fn in parts.items():
                if r >= reps.get(k, self.reps):
                    continue
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                times[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}

    def first_call(self, fn) -> float:
        """The first call alone (compilation included)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def synthetic_image_folder(root: Path, n: int, resolution: int, channels: int) -> Path:
    """``n`` random-noise PNGs: a step's cost does not depend on the pixels, and the GPU machine has no data."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (resolution, resolution, channels), dtype=torch.uint8, generator=g)
        Image.fromarray(pixels.squeeze(-1).numpy()).save(folder / f"{i:05d}.png")
    return folder


def init_dirs(cfg, root: Path) -> tuple[Path, Path]:
    """Untrained state_dicts to start Stage 1 (a denoiser) and Stage 2 (+ G1, H) from: a step costs the same."""
    s1, s2 = root / "init_stage1", root / "init_stage2"
    for d in (s1, s2):
        d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_denoiser(cfg).state_dict(), s1 / "denoiser.pt")
    for name, build in (("denoiser", build_denoiser), ("generator", build_generator), ("energy", build_energy)):
        torch.save(build(cfg).state_dict(), s2 / f"{name}.pt")
    return s1, s2


def built_stage1(cfg, init_dir, ctx: WorkerContext):
    """Stage 1 with an in-process bank of its own, filled (on every rank: each rank's bank is its own here)."""
    ctx.bank = local_bank(cfg, "stage1", snapshot_dir=None)
    stage = build_stage("stage1", cfg, ctx, init_dir)
    stage.on_start(0)
    if ctx.rank:
        stage.fill_bank()
    return stage


def stage1_anatomy(cfg, init_dir, device, timer: Timer, steps: int) -> dict:
    ctx = WorkerContext(device=device)
    stage = built_stage1(cfg, init_dir, ctx)
    lv = cfg.stage1.langevin
    x_pos, _ = next(stage.batches)
    z1, z2 = latents(cfg, len(x_pos), stage.shape, device)
    out = {"compile_first_step_s": timer.first_call(lambda: stage.train_step(0))}
    with torch.no_grad():
        x_gen = stage.hat_fast(z1, z2)

    def fwd_bwd():
        with frozen(stage.energy.net):
            energy_grad(stage.energy.fast, x_gen)

    def chain():
        return sample_stage1(stage.energy.fast, stage.hat_fast, z1, z2, lv)

    def residual_chain():  # the K Langevin steps alone, from the G pass's output
        return sample_residual(stage.energy.fast, x_gen, lv.steps, lv.step_size, lv.temperature, lv.drift_clip)

    x_neg = sum(chain())
    lease = ctx.bank.wait(ctx.bank.checkout(stage.local_batch))
    banked = stage.staging.to_device({k: lease[k] for k in ("z1", "z2", "x", "written")})

    def g_pass():
        with torch.no_grad():
            stage.hat_fast(z1, z2)

    step = iter(range(1, 10**9))
    parts = {
        "fwd_bwd_input_s": fwd_bwd,
        "chain_s": residual_chain,
        "g_pass_s": g_pass,
        "h_update_s": lambda: stage.energy.update(x_pos, x_neg),
        "g1_update_s": lambda: stage.update_generator(banked),
        "step_s": lambda: stage.train_step(next(step)),
    }
    out.update(timer.rounds(parts, {"chain_s": steps, "step_s": steps}))
    out["langevin_step_s"] = out["chain_s"] / lv.steps
    out["ideal_s"] = out["g_pass_s"] + out["chain_s"] + out["h_update_s"] + out["g1_update_s"]
    out["step_over_ideal"] = out["step_s"] / out["ideal_s"]
    out["langevin_step_over_fwd_bwd"] = out["langevin_step_s"] / out["fwd_bwd_input_s"]
    return out


def stage2_anatomy(cfg, init_dir, device, timer: Timer, steps: int) -> dict:
    stage = build_stage("stage2", cfg, WorkerContext(device=device), init_dir)
    stage.on_start(0)
    x_pos, _ = next(stage.batches)
    out = {"compile_first_step_s": timer.first_call(lambda: stage.train_step(0))}
    z1, z2 = latents(cfg, len(x_pos), stage.shape, device)
    kwargs = joint_sampler_kwargs(cfg)

    def chain():
        return sample_joint(stage.energy.fast, stage.hat_fast, z1, z2, modules=(stage.hat,), **kwargs)

    y, _, _, x_gen = chain()
    x_neg = (x_gen + y).detach()

    def fwd_bwd():
        with frozen(stage.energy.net):
            energy_grad(stage.energy.fast, x_neg)

    step = iter(range(1, 10**9))
    parts = {
        "fwd_bwd_input_s": fwd_bwd,
        "chain_s": chain,
        "h_update_s": lambda: stage.energy.update(x_pos, x_neg),
        "step_s": lambda: stage.train_step(next(step)),
    }
    out.update(timer.rounds(parts, {"chain_s": steps, "step_s": steps}))
    out["ideal_s"] = out["chain_s"] + out["h_update_s"]
    out["step_over_ideal"] = out["step_s"] / out["ideal_s"]
    y_steps = cfg.stage2.langevin.steps
    out["chain_over_y_fwd_bwd"] = out["chain_s"] / (y_steps * out["fwd_bwd_input_s"])
    return out


def diffusion_anatomy(cfg, device, timer: Timer, steps: int) -> dict:
    stage = build_stage("diffusion", cfg, WorkerContext(device=device))
    x0, _ = next(stage.batches)
    d = cfg.diffusion
    out = {"compile_first_step_s": timer.first_call(lambda: stage.train_step(0))}

    def fwd_bwd():
        stage.denoiser.opt.zero_grad(set_to_none=True)
        loss = diffusion_loss(stage.ddp, stage.schedule, x0, d.T_trunc, d.loss_weighting)
        stage.denoiser.scaler.scale(loss).backward()

    fwd_bwd()
    step = iter(range(1, 10**9))
    parts = {
        "fwd_bwd_s": fwd_bwd,
        "opt_step_s": lambda: stage.denoiser.opt.step(),
        "step_s": lambda: stage.train_step(next(step)),
    }
    out.update(timer.rounds(parts))
    out["ideal_s"] = out["fwd_bwd_s"] + out["opt_step_s"]
    out["step_over_ideal"] = out["step_s"] / out["ideal_s"]
    return out


def _worker(rank: int, world: int, cfg, init_dir, steps: int, port: int, result_file: str) -> None:
    """One gloo rank of the scaling run: Stage 1 under DDP with this rank's share of the global batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = WorkerContext(rank=rank, world_size=world, wrap_fn=DDP)
    timer = Timer(torch.device("cpu"), reps=steps, warmup=1)
    result = stage1_scaling_step(cfg, init_dir, ctx, timer)
    if rank == 0:
        Path(result_file).write_text(json.dumps(result))
    dist.destroy_process_group()


def stage1_scaling_step(cfg, init_dir, ctx: WorkerContext, timer: Timer) -> float:
    stage = built_stage1(cfg, init_dir, ctx)
    step = iter(range(10**9))
    return timer(lambda: stage.train_step(next(step)))


def scaling(cfg, init_dir, steps: int) -> dict:
    """Seconds per Stage 1 step with 1 and 2 gloo workers at the same global batch; efficiency = t1 / (2 · t2)."""
    import torch.multiprocessing as mp

    result = {}
    for world in (1, 2):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        port = 29500 + os.getpid() % 1000 + world
        mp.spawn(_worker, args=(world, cfg, init_dir, steps, port, path), nprocs=world, join=True)
        result[f"stage1_step_s_{world}_workers"] = json.loads(Path(path).read_text())
        os.unlink(path)
    result["speedup_2_over_1"] = result["stage1_step_s_1_workers"] / result["stage1_step_s_2_workers"]
    result["scaling_efficiency"] = result["speedup_2_over_1"] / 2
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--variants",
        default="fp32/none,bf16/none,fp32/default",
        help="comma-separated compute.precision/compute.compile pairs, the first the baseline of the speed-ups",
    )
    p.add_argument("--steps", type=int, default=4, help="timed whole steps (and whole chains) per measurement")
    p.add_argument("--reps", type=int, default=6, help="timed calls per cheaper part")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (a 1-CPU Ray worker has 1)")
    p.add_argument("--skip-scaling", action="store_true", help="no 1 vs 2 worker run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    overrides = ["ray.num_workers=1", f"ray.use_gpu={device.type == 'cuda'}"]
    if args.preset == "cifar10":  # the paper's Stage 1 step: batch 128, K = 50, on this one device
        overrides += ["stage1.batch_size=128", "stage1.langevin.steps=50"]
    overrides += args.set
    base = load_config(args.preset, overrides=overrides)
    root = Path(tempfile.mkdtemp(prefix="hdebm-anatomy-"))
    if base.data.dataset not in ("digits", "toy2d"):  # offline: noise images of the preset's size stand in
        batch = max(base.stage1.batch_size, base.stage2.batch_size, base.diffusion.batch_size)
        folder = synthetic_image_folder(root, 2 * batch, base.data.resolution, base.data.channels)
        base = base.replace(**{"data.dataset": "image_folder", "data.path": str(folder)})
    s1_dir, s2_dir = init_dirs(base, root)
    timer = Timer(device, reps=args.reps, warmup=2)
    name = "cpu" if device.type == "cpu" else f"cuda-{torch.cuda.get_device_name(device).replace(' ', '_')}"
    result = {
        "preset": args.preset,
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stage1_batch_size": base.stage1.batch_size,
        "stage1_langevin_steps": base.stage1.langevin.steps,
        "stage2_batch_size": base.stage2.batch_size,
        "stage2_langevin_steps": base.stage2.langevin.steps,
        "diffusion_batch_size": base.diffusion.batch_size,
        "variants": {},
    }
    for variant in args.variants.split(","):
        precision, _, mode = variant.partition("/")
        cfg = base.replace(**{"compute.precision": precision, "compute.compile": mode or "none"})
        key = f"{precision}/compile={mode or 'none'}"
        print(f"[anatomy] {key} ...", flush=True)
        torch.manual_seed(0)
        result["variants"][key] = {
            "stage1": stage1_anatomy(cfg, s1_dir, device, timer, args.steps),
            "stage2": stage2_anatomy(cfg, s2_dir, device, timer, args.steps),
            "diffusion": diffusion_anatomy(cfg, device, timer, args.steps),
        }
        print(json.dumps(result["variants"][key], indent=1), flush=True)
    if args.skip_scaling:
        result["scaling"] = {"skipped": "--skip-scaling"}
    elif device.type == "cpu":
        result["scaling"] = scaling(base, s1_dir, args.steps)
    else:
        result["scaling"] = {"skipped": "2 nccl workers need 2 GPUs; this check runs on one"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_anatomy_{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"step_anatomy_{name}.md").write_text(markdown(result))
    print(markdown(result))
    print("\n".join(goals_lines(result)))


if __name__ == "__main__":
    main()
