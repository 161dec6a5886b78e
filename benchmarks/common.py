"""Pieces the benchmarks share: a cheap distilled denoiser to start Stage 1 from, and writing results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from hdebm_ray.training.runner import run_in_process


def untrained_distilled(cfg, root: str) -> str:
    """A one-step denoiser checkpoint; a step's cost does not depend on how well D was trained."""
    one = {"diffusion.steps": 1, "diffusion.report_every": 1, "diffusion.checkpoint_every": 1, "distill.n0_steps": 1}
    cfg = cfg.replace(**one)
    _, ck = run_in_process(cfg, "diffusion", f"{root}/d")
    _, ck = run_in_process(cfg, "distill", f"{root}/k", init_dir=ck)
    return str(ck)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"


def write_results(out: str | Path, name: str, title: str, result: dict) -> None:
    """``<out>/<name>.json`` and a Markdown table ``<out>/<name>.md``; also printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return ", ".join(cell(x) for x in v)
        return str(v)

    lines = [f"| {k} | {cell(v)} |" for k, v in result.items()]
    (out / f"{name}.md").write_text(f"# {title}\n\n| measure | value |\n|---|---|\n" + "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))
