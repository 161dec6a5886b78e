"""The imagenet128 preset end to end on CPU: its networks shrunk and every stage a few steps (``--set``), from a
folder of synthetic 128-px RGB images streamed through Ray Data, with an eval actor scoring Stage 1 / 2 against
the streamed reference statistics (a 2048-d TorchScript feature net stands in for Inception, whose weights cannot
be fetched offline). Checks what came out and records the wall time.

    .venv/bin/python benchmarks/imagenet128_cpu.py [--images 256] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_scale import HERE, feature_net, make_folder

SHRUNK = [
    # CPU: no GPU, fp32 eager, two 1-CPU workers and one 1-CPU eval actor
    "ray.use_gpu=false",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
    "compute.precision=fp32",
    "compute.compile=none",
    "compute.adam=auto",
    "compute.tf32=false",
    "data.loader=ray_data",  # 256 small images would fit data.in_memory_mb: stream them as ImageNet would be
    "data.preprocess_cpus=1",
    "data.shuffle_buffer=64",
    # the preset's network shapes, narrow
    "network.unet.channels=16",
    "network.unet.num_res_blocks=1",
    "network.unet.attn_resolutions=[8]",
    "network.unet.num_head_channels=0",
    "network.energy.width=8",
    # a few steps of every stage
    "diffusion.steps=2",
    "diffusion.batch_size=8",
    "diffusion.report_every=1",
    "diffusion.checkpoint_every=2",
    "distill.n0_steps=2",
    "distill.steps_per_stage=2",
    "distill.batch_size=8",
    "distill.eval_batch=8",
    "distill.report_every=1",
    "distill.checkpoint_every=2",
    "stage1.steps=4",
    "stage1.batch_size=8",
    "stage1.bank_size=32",
    "stage1.langevin.steps=2",
    "stage1.warmup_steps=0",
    "stage1.report_every=2",
    "stage1.checkpoint_every=2",
    "stage2.steps=2",
    "stage2.batch_size=8",
    "stage2.langevin.steps=2",
    "stage2.report_every=1",
    "stage2.checkpoint_every=2",
    "eval.features=torchscript",
    "eval.num_samples=32",
    "eval.batch_size=32",
    "eval.kid_reference_samples=200",
    "eval.gpus_per_actor=0",
    "eval.cpus_per_actor=1",
    "eval.image_grid=16",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hdebm-in128-") as tmp:
        root = Path(tmp)
        make_folder(root / "images", args.images, 128)
        feature_net(root / "features.pt")
        sets = SHRUNK + [
            f"data.path={root / 'images'}",
            f"eval.torchscript_path={root / 'features.pt'}",
            f"run.storage_path={root / 'runs'}",
            "run.name=in128",
        ]
        cmd = [sys.executable, "-m", "hdebm_ray", "pipeline", "--preset", "imagenet128"]
        for s in sets:
            cmd += ["--set", s]
        start = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if r.returncode:
            raise SystemExit(f"the pipeline failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        run = root / "runs" / "in128"
        state = json.loads((run / "pipeline.json").read_text())
        results = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        stats = sorted((root / "images" / "fid_cache").glob("ref-*.npz"))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        streamed = {}
        for stage in state:
            acc = EventAccumulator(str(run / "tb" / stage))
            acc.Reload()
            streamed[stage] = acc.Scalars("Data/train_batches")[-1].value
    assert list(state) == ["diffusion", "distill", "stage1", "stage2"], state
    assert {r["stage"] for r in results} == {"stage1", "stage2"} and len(stats) == 1
    result = {
        "images": args.images,
        "resolution": 128,
        "wall_s": round(wall, 1),
        "stages": list(state),
        "Data/train_batches at the last report, by stage": streamed,
        "scored": [f"{r['stage']} step {r['step']}: FID {r['fid']:.4g}" for r in results],
        "overrides": SHRUNK,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "imagenet128_cpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
