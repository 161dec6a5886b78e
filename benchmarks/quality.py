"""Sample quality of every algorithm on the offline data, on one wall clock: FID against minutes of training.

    python benchmarks/quality.py --preset digits --budget-min 6
    python benchmarks/quality.py --preset toy2d --methods hdebm,mebm

Each method trains in this process (the pure-torch core, no Ray: the same steps a Ray worker runs, without the
cluster's start-up costs) with its preset, writing ``--points`` checkpoints along the way. HDEBM's clock counts
all four stages (diffusion, distillation, Stage 1, Stage 2); a checkpoint's minute is when it was written.

The data are split once (seed 0) into a **reference** part (80%) and a disjoint **held-out** part (20%). Every
checkpoint is scored against the reference part: FID, KID, k-NN precision / recall, and the FID of its chain
starts (HDEBM: G(z) alone on the same latents; M-EBM / M-JEM: p0; Improved CD: uniform noise); on toy2d also the
mode coverage. A method's **best** checkpoint is the one with the lowest FID against the held-out part (never the
reference part); its **final** one is the last written within ``--budget-min``. The floor: held-out data scored
as if they were samples.

Writes ``<out>/quality_<name>.json`` / ``.md`` (``--name``, default the preset: every checkpoint, then best and
final per method) and sample grids ``<out>/quality_<name>/<method>-<stage>-<best|final>.png``. Re-running some
``--methods`` keeps the other methods' rows of an earlier result of the same name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from hdebm_ray.config import load_config  # noqa: E402
from hdebm_ray.core.toy_metrics import mode_coverage  # noqa: E402
from hdebm_ray.data.datasets import build_dataset, iter_batches, toy2d_centres  # noqa: E402
from hdebm_ray.evaluation.fid import FeatureSpace, frechet_distance, kernel_distance, sample_checkpoint  # noqa: E402
from hdebm_ray.evaluation.images import save_grid  # noqa: E402
from hdebm_ray.evaluation.sample_metrics import precision_recall  # noqa: E402
from hdebm_ray.io.checkpoint import load_meta  # noqa: E402
from hdebm_ray.training.pipeline import run_pipeline  # noqa: E402
from hdebm_ray.training.runner import fit_in_process  # noqa: E402

METHODS = {  # the stages each method trains, and the ones whose checkpoints are its samplers
    "hdebm": (("diffusion", "distill", "stage1", "stage2"), ("stage1", "stage2")),
    "mebm": (("mebm",), ("mebm",)),
    "mjem": (("mjem",), ("mjem",)),
    "icd": (("icd",), ("icd",)),
}
HELD_OUT_FRACTION = 0.2


def split_features(cfg, space: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
    """Features of the reference (80%) and held-out (20%) parts of the dataset, split with seed 0."""
    ds = build_dataset(cfg)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    n_held = int(len(ds) * HELD_OUT_FRACTION)

    def feats(indices):
        return np.concatenate([space.of_samples(x) for x, _ in iter_batches(ds, 1024, indices)])

    return feats(perm[n_held:]), feats(perm[:n_held])


def scores(feats: np.ndarray, ref: np.ndarray, cfg) -> dict:
    n = min(len(feats), len(ref))
    precision, recall = precision_recall(ref[:n], feats[:n], cfg.eval.pr_k)
    return {
        "fid": frechet_distance(feats, ref),
        "kid": kernel_distance(feats, ref, cfg.eval.kid_subsets),
        "precision": precision,
        "recall": recall,
    }


def with_points(cfg, stage: str, points: int):
    """The stage's preset, checkpointing ``points`` times (and so reporting at least as often), keeping every
    checkpoint's bank / replay-buffer snapshot (a replay sampler needs its checkpoint's own)."""
    section = getattr(cfg, stage)
    every = max(1, section.steps // points)
    keep = {"ray.checkpoints_to_keep": points + 1}
    return cfg.replace(**{f"{stage}.report_every": every, f"{stage}.checkpoint_every": every, **keep})


def train(cfg, method: str, root: Path, points: int) -> list[dict]:
    """Train the method's stages in order (HDEBM: the core pipeline, each stage from the previous one's final
    checkpoint); every checkpoint of its scored stages with the minute it was written."""
    stages, scored = METHODS[method]
    shutil.rmtree(root / method, ignore_errors=True)  # a fresh run: a resumed one would not be on the clock
    run_cfg = cfg.replace(**{"run.storage_path": str(root), "run.name": method})
    clock = {"s": 0.0}
    found = []

    def fit(stage_cfg, stage: str, init_from):
        stage_cfg = with_points(stage_cfg, stage, points) if stage in scored else stage_cfg
        started = time.time()
        print(f"[quality] {method}: training {stage}", flush=True)
        result = fit_in_process(stage_cfg, stage, init_from)
        if stage in scored:
            for ckpt in sorted((root / method / stage).glob("checkpoint_*")):
                meta = load_meta(ckpt)
                minute = (clock["s"] + meta["saved_at"] - started) / 60
                found.append({"method": method, "stage": stage, "step": meta["step"], "minute": minute, "ckpt": ckpt})
        clock["s"] += time.time() - started
        return result

    if method == "hdebm":
        run_pipeline(run_cfg, fit, list(stages))
    else:
        fit(run_cfg, stages[0], None)
    return found


def score_checkpoint(row: dict, cfg, space, ref, held, n: int) -> dict:
    samples, starts, _, sampler = sample_checkpoint(row["ckpt"], n, cfg.eval.batch_size, "cpu", seed=0)
    feats = space.of_samples(samples)
    out = {**row, "ckpt": str(row["ckpt"]), **scores(feats, ref, cfg), "fid_held_out": frechet_distance(feats, held)}
    if starts is not None:
        start_feats = space.of_samples(starts)
        out["start"] = sampler.start_name
        out["fid_start"] = frechet_distance(start_feats, ref)
    if cfg.data.dataset == "toy2d":
        centres = toy2d_centres(cfg.data.toy2d_mixture)
        for name, x in (("", samples), ("_start", starts)):
            if x is not None:
                m = mode_coverage(x, centres, cfg.data.toy2d_std)
                out[f"modes{name}"], out[f"quality{name}"] = m["modes_covered"], m["high_quality_fraction"]
    return out


def summarise(rows: list[dict], budget_min: float | None) -> list[dict]:
    """Per method (and HDEBM stage): the best checkpoint by held-out FID and the final one, within the budget."""
    out = []
    for key in dict.fromkeys((r["method"], r["stage"]) for r in rows):
        mine = [
            r for r in rows if (r["method"], r["stage"]) == key and (budget_min is None or r["minute"] <= budget_min)
        ]
        if mine:
            best = min(mine, key=lambda r: r["fid_held_out"])
            out += [{**best, "pick": "best"}, {**max(mine, key=lambda r: r["step"]), "pick": "final"}]
    return out


COLUMNS = [("method", "method"), ("stage", "stage"), ("pick", "checkpoint"), ("step", "step"),
           ("minute", "min"), ("fid", "FID"), ("kid", "KID"), ("precision", "P"), ("recall", "R"),
           ("fid_start", "chain-start FID"), ("fid_held_out", "held-out FID"), ("quality", "3σ quality"),
           ("modes", "modes"), ("quality_start", "start 3σ quality")]  # fmt: skip


def table(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--methods", default="hdebm,mebm,mjem,icd")
    p.add_argument("--budget-min", type=float, help="compare checkpoints written within this many minutes")
    p.add_argument("--points", type=int, default=4, help="checkpoints per scored stage")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--work", default="/tmp/hdebm-quality", help="runs go here (each method's folder is replaced)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", help="names the results (quality_<name>.*) and work folder; default: the preset")
    p.add_argument("--set", action="append", default=[], help="dotted.key=value for every method")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    name = args.name or args.preset
    work = Path(args.work) / name
    cfg = load_config(args.preset, overrides=[f"data.path={work / 'data'}", *args.set])
    space = FeatureSpace(cfg, progress=True)
    ref, held = split_features(cfg, space)
    floor = {"method": "data", "stage": "held-out", "pick": "-", "step": 0, "minute": 0.0, **scores(held, ref, cfg)}
    rows = []
    for method in methods:
        for row in train(cfg, method, work, args.points):
            rows.append(score_checkpoint(row, cfg, space, ref, held, args.samples))
            r = rows[-1]
            print(f"[quality] {method} {r['stage']} step {r['step']} ({r['minute']:.1f} min): FID {r['fid']:.4g}")
    out = Path(args.out)
    previous = out / f"quality_{name}.json"
    if previous.exists():  # re-running some methods keeps the others' rows (same data split and features)
        kept = [r for r in json.loads(previous.read_text())["checkpoints"] if r["method"] not in methods]
        print(f"[quality] kept {len(kept)} checkpoints of {sorted({r['method'] for r in kept})} from {previous}")
        rows = kept + rows
    summary = summarise(rows, args.budget_min) + [floor]
    grids = out / f"quality_{name}"
    for r in summary:
        if r["method"] != "data" and Path(r["ckpt"]).exists():
            x = sample_checkpoint(r["ckpt"], 64, 64, "cpu", seed=0)[0]
            png = f"{r['method']}-{r['stage']}-{r['pick']}.png"
            save_grid(x, grids / png, cfg, caption=f"{r['method']} {r['stage']} step {r['step']} ({r['pick']})")
    result = {"preset": args.preset, "name": name, "overrides": args.set, "machine": machine(),
              "budget_min": args.budget_min, "samples": args.samples, "features": cfg.eval.features,
              "summary": summary, "checkpoints": rows}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{name}.json").write_text(json.dumps(result, indent=2, default=str))
    budget = f"within {args.budget_min:g} min" if args.budget_min else "each method's preset length"
    overrides = "".join(f", {o}" for o in args.set)
    text = (
        f"# Quality on {name} (preset {args.preset}{overrides}; {cfg.eval.features} features, {args.samples} "
        f"samples, {machine()})\n\n"
        f"Best (lowest held-out FID) and final checkpoint per method, {budget}; 'data' is the held-out split "
        f"scored as samples (the floor).\n\n{table(summary)}\n\n## Every checkpoint (FID against minutes)\n\n"
        f"{table(rows)}\n"
    )
    (out / f"quality_{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
