"""Population-based training against random search over HDEBM Stage 1 on toy2d, at equal total trial-steps.

    python benchmarks/pbt_vs_random.py [--init-from DISTILLED_CHECKPOINT]

Both arms run ``hdebm-ray tune`` on the same space (``tune_spaces/stage1_toy2d.yaml``), with the same seed (so
both start from the same sampled trials), the same number of trials and steps per trial, on an embedded local Ray:
``--scheduler fifo`` (random search, every trial trains to the end on its own parameters) and ``--scheduler pbt``
(every ``--pbt-interval`` steps the bottom quarter is replaced by a copy of the top quarter, bank included, with
mutated parameters). Each trial's final checkpoint is then scored the way ``tests/test_toy2d_learning.py`` scores
Stage 1: 2000 samples from the stage's own sampler, fraction within 3 std of a mode and modes covered. Results:
``results/pbt_vs_random.{json,md}``; the sweeps' own ``trials.csv`` stay under ``--work``.
Without ``--init-from`` the toy2d preset's diffusion and distillation are trained first (about 1.5 min).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

from hdebm_ray.config import load_config
from hdebm_ray.core.toy_metrics import mode_coverage
from hdebm_ray.data.datasets import toy2d_centres
from hdebm_ray.evaluation.sampling import Sampler
from hdebm_ray.io.checkpoint import latest_checkpoint, load_meta
from hdebm_ray.training.runner import run_in_process

SPACE = Path(__file__).resolve().parents[1] / "tune_spaces" / "stage1_toy2d.yaml"


def distilled(work: Path) -> str:
    cfg = load_config("toy2d")
    _, ck = run_in_process(cfg, "diffusion", work / "diffusion")
    return str(run_in_process(cfg, "distill", work / "distill", init_dir=ck)[1])


def run_sweep(scheduler: str, args, init: str) -> float:
    """One ``hdebm-ray tune`` sweep named after its scheduler; its wall time in minutes."""
    sets = [f"run.storage_path={args.work}", "run.name=toy", f"stage1.steps={args.steps}"]
    sets += [f"stage1.report_every={args.pbt_interval}", f"stage1.checkpoint_every={args.pbt_interval}"]
    cmd = [sys.executable, "-m", "hdebm_ray", "tune", "--preset", "toy2d", "--space", str(SPACE)]
    cmd += [a for s in sets for a in ("--set", s)]
    cmd += ["--name", scheduler, "--samples", str(args.trials), "--max-concurrent", str(args.max_concurrent)]
    cmd += ["--workers-per-trial", "1", "--cpus-per-worker", str(args.cpus_per_worker)]
    cmd += ["--scheduler", scheduler, "--init-from", init]
    if scheduler == "pbt":
        cmd += ["--pbt-interval", str(args.pbt_interval)]
    start = time.monotonic()
    with open(args.work / f"{scheduler}.log", "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"error: the {scheduler} sweep failed; see {args.work / f'{scheduler}.log'}")
    return (time.monotonic() - start) / 60


def final_checkpoint(trial: Path) -> Path:
    """A trial's last checkpoint: its Train run's, or under PBT its last chunk's (``stage1-to-<step>-*``)."""
    done = [c for c in trial.glob("stage1*/checkpoint_0*") if (c / "meta.json").exists()]
    return max(done, key=lambda c: (load_meta(c)["step"], c.stat().st_mtime))


def score_arm(name: str, args, minutes: float) -> dict:
    centres = toy2d_centres(load_config("toy2d").data.toy2d_mixture)
    rows = []
    for trial in sorted((args.work / name / "trials").glob("trial-*")):
        ck = final_checkpoint(trial)
        samples, starts = Sampler(ck).sample_with_start(args.samples, seed=123)
        s1, g = mode_coverage(samples, centres, 0.05), mode_coverage(starts, centres, 0.05)
        cfg = load_config(config_file=str(ck / "config.yaml")).stage1
        rows.append(
            {
                "trial": trial.name,
                "step": load_meta(ck)["step"],
                "quality": round(s1["high_quality_fraction"], 3),
                "modes": s1["modes_covered"],
                "g_quality": round(g["high_quality_fraction"], 3),
                "params": {
                    "step_size": cfg.langevin.step_size,
                    "langevin_steps": cfg.langevin.steps,
                    "lr_energy": cfg.lr_energy,
                    "lr_generator": cfg.lr_generator,
                },
            }
        )
    history = [
        json.loads(x) for f in (args.work / name / "trials").glob("*/stage1/pbt_history.jsonl") for x in f.open()
    ]
    exploits = [h for h in history if h["from_trial"] != h["trial"]]
    qualities = sorted(r["quality"] for r in rows)
    return {
        "minutes": round(minutes, 2),
        "trial_steps": sum(r["step"] for r in rows),
        "best_quality": qualities[-1],
        "median_quality": qualities[len(qualities) // 2],
        "worst_quality": qualities[0],
        "exploits": len(exploits),
        "trials": rows,
    }


def markdown(result: dict, args) -> str:
    lines = [
        "# PBT against random search, HDEBM Stage 1 on toy2d, equal total trial-steps",
        "",
        f"`python benchmarks/pbt_vs_random.py` — {args.trials} trials x {args.steps} steps per arm, space "
        f"`tune_spaces/stage1_toy2d.yaml`, one Train worker per trial, {args.max_concurrent} trials at once, "
        f"PBT every {args.pbt_interval} steps; each trial's final checkpoint scored "
        f"on {args.samples} samples (fraction within 3 std of a mode). Machine: {common.machine()}.",
        "",
        "| arm | minutes | trial-steps | best | median | worst | exploits |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("fifo", "pbt"):
        r = result[arm]
        lines.append(
            f"| {'random search' if arm == 'fifo' else 'PBT'} | {r['minutes']} | {r['trial_steps']} | "
            f"{r['best_quality']} | {r['median_quality']} | {r['worst_quality']} | {r['exploits']} |"
        )
    lines += [
        "",
        "| arm | trial | final step | quality | modes | G(z) quality | final parameters (after PBT, guard back-offs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("fifo", "pbt"):
        for t in result[arm]["trials"]:
            p = ", ".join(f"{k} {v:.3g}" for k, v in t["params"].items())
            lines.append(
                f"| {arm} | {t['trial']} | {t['step']} | {t['quality']} | {t['modes']} | {t['g_quality']} | {p} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init-from", help="a distilled toy2d checkpoint (default: train one)")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=600, help="Stage 1 steps per trial")
    p.add_argument("--pbt-interval", type=int, default=150)
    # One Train worker per trial and two trials at once fit 2 cores (each trial's driver takes 0.1 CPU besides):
    # Train V2 asks for a trial's workers only once its driver runs, so more trials than fit time out starting them.
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--work", type=Path, default=Path("/tmp/hdebm-pbt-vs-random"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    for arm in ("fifo", "pbt"):
        if (args.work / arm).exists():
            sys.exit(f"error: --work {args.work} already holds a {arm!r} sweep; remove it or pick another --work")
    args.work.mkdir(parents=True, exist_ok=True)
    init = args.init_from or distilled(args.work)
    if latest_checkpoint(Path(init)) is None and not (Path(init) / "meta.json").exists():
        sys.exit(f"error: --init-from {init}: no checkpoint there")
    result = {arm: score_arm(arm, args, run_sweep(arm, args, init)) for arm in ("fifo", "pbt")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pbt_vs_random.json").write_text(json.dumps(result, indent=2))
    (out / "pbt_vs_random.md").write_text(markdown(result, args))
    print(markdown(result, args))


if __name__ == "__main__":
    main()
