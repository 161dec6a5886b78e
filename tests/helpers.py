"""Small configs shared by the Ray integration tests."""

from __future__ import annotations

from pathlib import Path


def small_digits_overrides(storage: str, name: str) -> list[str]:
    """A digits config small enough for a 2-worker CPU TorchTrainer in seconds per step."""
    return [
        f"run.storage_path={storage}",
        f"run.name={name}",
        "network.unet.channels=16",
        "network.unet.channel_mult=[1,2]",
        "network.unet.attn_resolutions=[8]",
        "diffusion.batch_size=16",
        "distill.batch_size=16",
        "distill.eval_batch=16",
    ]


# Every stage a few steps long: for exercising the whole pipeline, not for learning.
TINY = [
    "diffusion.steps=2",
    "diffusion.report_every=1",
    "diffusion.checkpoint_every=2",
    "distill.n0_steps=2",
    "distill.steps_per_stage=2",
    "distill.report_every=1",
    "distill.checkpoint_every=2",
    "stage1.steps=4",
    "stage1.report_every=2",
    "stage1.checkpoint_every=2",
    "stage1.batch_size=16",
    "stage1.bank_size=48",
    "stage1.langevin.steps=3",
    "stage2.steps=2",
    "stage2.report_every=1",
    "stage2.checkpoint_every=1",
    "stage2.batch_size=16",
    "stage2.langevin.steps=5",
    "mebm.steps=4",
    "mebm.report_every=2",
    "mebm.checkpoint_every=2",
    "mebm.batch_size=16",
    "mebm.buffer_size=64",
    "mebm.langevin.steps=3",
    "mjem.steps=4",
    "mjem.report_every=2",
    "mjem.checkpoint_every=2",
    "mjem.batch_size=16",
    "mjem.classifier_batch_size=16",
    "mjem.buffer_size=64",
    "mjem.langevin.steps=3",
    "icd.steps=4",
    "icd.report_every=2",
    "icd.checkpoint_every=2",
    "icd.batch_size=16",
    "icd.buffer_size=64",
    "icd.langevin.steps=3",
    "icd.kl_samples=4",  # of 8 chains per rank: both the graph step and the plain one run
    "icd.entropy_min_filled=16",
    "icd.entropy_reference=8",
    "icd.sample_steps=6",
    "icd.sample_augment_every=3",
    "network.energy.width=16",
    "network.generator.width=16",
    # cheap evaluation wherever a preset runs eval actors
    "eval.features=raw",
    "eval.num_samples=64",
    "eval.image_grid=16",
]


# Stage 1 trials of toy2d short enough for Tune tests: 4 report ticks each.
TOY_TRIAL = [
    "ray.num_workers=1",
    "stage1.steps=40",
    "stage1.report_every=10",
    "stage1.checkpoint_every=20",
    "stage1.batch_size=128",
    "stage1.bank_size=512",
]


def distilled_toy(root: Path) -> str:
    """A small toy2d diffusion model distilled to one step, trained in process (no Ray); its checkpoint dir."""
    from hdebm_ray.config import load_config
    from hdebm_ray.training.runner import run_in_process

    cfg = load_config(
        "toy2d",
        overrides=[
            "diffusion.steps=300",
            "diffusion.checkpoint_every=300",
            "diffusion.report_every=100",
            "distill.n0_steps=2",
            "distill.steps_per_stage=30",
            "distill.report_every=30",
            "distill.checkpoint_every=30",
        ],
    )
    _, ckpt = run_in_process(cfg, "diffusion", root / "diffusion")
    _, ckpt = run_in_process(cfg, "distill", root / "distill", init_dir=ckpt)
    return str(ckpt)


def newest_registered_step(stage_dir: Path) -> int:
    """The newest checkpoint's step that Ray Train has registered for a stage, 0 if none. Registered, not merely on
    disk: a checkpoint the controller has not registered yet is not what a restart resumes from (a kill then
    restarts from the one before, or from scratch, with no bank restore to record)."""
    from hdebm_ray.io.checkpoint import load_meta, registered_names

    names = registered_names(str(stage_dir)) or set()  # None: no record yet, or caught mid-write
    return max((load_meta(stage_dir / n)["step"] for n in names), default=0)


class HoldAfter:
    """A report hook: from report ``step`` on, each rank waits (up to ``timeout_s``) until the file ``release``
    exists. A fault injected while the ranks hold lands mid-run, however fast the steps are: without the hold a
    short run can finish in the time a fault takes to be detected, and there is no restart to check."""

    def __init__(self, step: int, release: str, timeout_s: float = 120.0):
        self.step, self.release, self.timeout_s = step, release, timeout_s

    def __call__(self, rank: int, step: int) -> None:
        import os
        import time

        deadline = time.monotonic() + self.timeout_s
        while step >= self.step and not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.05)


class RecordNode:
    """A report hook: each rank writes the id of the Ray node it runs on to ``<folder>/rank<r>``."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, rank: int, step: int) -> None:
        import os

        import ray

        with open(os.path.join(self.folder, f"rank{rank}"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())


class RecordSteps:
    """A report hook: each rank appends ``<pid> <step>`` to ``<folder>/rank<r>.steps`` (an attempt's workers are
    new processes: the pids tell the attempts apart)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, rank: int, step: int) -> None:
        import os

        with open(os.path.join(self.folder, f"rank{rank}.steps"), "a") as f:
            f.write(f"{os.getpid()} {step}\n")


class RecordWorldSize:
    """A report hook: rank 0 appends ``<step> <world size>`` to ``<folder>/world``."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, rank: int, step: int) -> None:
        import os

        import ray

        if rank == 0:
            with open(os.path.join(self.folder, "world"), "a") as f:
                f.write(f"{step} {ray.train.get_context().get_world_size()}\n")


class SlowAfter:
    """A report hook: from report ``step`` on, each report waits ``seconds`` (a run long enough for a watcher that
    polls every few seconds to see what the test does to it)."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = step, seconds

    def __call__(self, rank: int, step: int) -> None:
        import time

        if step >= self.step:
            time.sleep(self.seconds)


def distilled_digits(root: Path) -> str:
    """A tiny distilled digits denoiser (TINY, in process), for tests of Stage 1 on Ray; its checkpoint dir."""
    from hdebm_ray.config import load_config
    from hdebm_ray.training.runner import run_in_process

    cfg = load_config("digits", overrides=small_digits_overrides(str(root), "base") + TINY)
    _, ck = run_in_process(cfg, "diffusion", root / "d")
    return str(run_in_process(cfg, "distill", root / "k", init_dir=ck)[1])


def wait_for(predicate, what: str, timeout_s: float = 240.0, poll_s: float = 0.1):
    """``predicate()``'s first truthy value, polled; AssertionError naming ``what`` after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def cli_command(*args: str, overrides=(), address: str | None = None) -> list[str]:
    """``python -m hdebm_ray <args> --set <override>...`` (and ``--address``)."""
    import sys

    cmd = [sys.executable, "-m", "hdebm_ray", *args] + [a for o in overrides for a in ("--set", o)]
    return cmd + (["--address", address] if address else [])
