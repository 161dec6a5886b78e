"""PBT against random search over one stage, at equal total trial-steps: the same space, trials and steps.

    python benchmarks/pbt_vs_random.py --init-from runs/toy2d/distill/checkpoint_<...>
    python benchmarks/pbt_vs_random.py --preset toy2d --space tune_spaces/stage1_toy2d.yaml --samples 4

Runs ``hdebm-ray tune`` twice, as a user would (each on its own embedded local Ray): once with random search
(``--scheduler fifo``: every trial keeps its sampled parameters for the whole stage) and once with synchronous
PBT (``--scheduler pbt --pbt-interval``: every interval the bottom quantile clones the top quantile's checkpoint
and bank, then explores). Both sample ``--samples`` trials from the same space with the same seed, and every trial
trains the stage's full ``steps``, so both spend ``samples x steps`` trial-steps. Reports each trial's final
metric, the best and the median, the wall time, and PBT's exploits (from its trials' ``pbt_history.jsonl``).

Writes ``<out>/pbt_vs_random_<preset>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from hdebm_ray.config import load_config  # noqa: E402
from hdebm_ray.distributed.search_space import load_space  # noqa: E402


def sweep(args, scheduler: str, storage: Path) -> dict:
    name = f"{scheduler}-{args.preset}"
    cmd = [sys.executable, "-m", "hdebm_ray", "tune", "--preset", args.preset, "--space", args.space]
    cmd += ["--samples", str(args.samples), "--name", name, "--scheduler", scheduler]
    cmd += ["--workers-per-trial", "1", "--set", f"run.storage_path={storage}", *args.tune_args]
    if args.init_from:
        cmd += ["--init-from", args.init_from]
    if scheduler == "pbt":
        cmd += ["--pbt-interval", str(args.pbt_interval)]
    print("[pbt_vs_random]", " ".join(cmd), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    wall_s = time.time() - started
    rows = list(csv.DictReader((storage / name / "trials.csv").open()))
    finals = [float(r[args.metric]) for r in rows if r.get(args.metric)]
    exploits = []
    for history in sorted((storage / name).glob("*/*/pbt_history.jsonl")):
        exploits += [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    exploits = [e for e in exploits if e.get("from_trial") and e.get("from_trial") != e.get("trial")]
    return {
        "scheduler": scheduler,
        "trials": len(rows),
        "finals": finals,
        "best": max(finals) if args.mode == "max" else min(finals),
        "median": statistics.median(finals),
        "wall_s": wall_s,
        "exploits": len(exploits),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="toy2d")
    p.add_argument("--space", default="tune_spaces/stage1_toy2d.yaml")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--pbt-interval", type=int, default=150, help="steps between PBT's perturbations")
    p.add_argument("--init-from", help="the checkpoint the swept stage starts from")
    p.add_argument("--work", default="/tmp/hdebm-pbt-vs-random", help="the sweeps' storage (replaced)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tune-arg", dest="tune_args", action="append", default=[], help="passed on to hdebm-ray tune")
    args = p.parse_args(argv)
    base = load_config(args.preset)
    space = load_space(args.space, base)
    args.metric, args.mode = space.metric, space.mode
    steps = getattr(base, space.stage).steps
    storage = Path(args.work)
    subprocess.run(["rm", "-rf", str(storage)], check=True)
    results = [sweep(args, s, storage) for s in ("fifo", "pbt")]
    text = [
        f"# PBT vs random search: {space.stage} on {args.preset} ({machine()})\n",
        f"{args.samples} trials x {steps} steps each ({args.samples * steps} trial-steps per sweep), space "
        f"`{args.space}`, metric {args.metric} ({args.mode}) at each trial's last report; PBT every "
        f"{args.pbt_interval} steps.\n",
        "| search | best | median | every trial's final | exploits | wall |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        finals = ", ".join(f"{v:.3f}" for v in r["finals"])
        label = "random (fifo)" if r["scheduler"] == "fifo" else "PBT"
        text.append(
            f"| {label} | {r['best']:.3f} | {r['median']:.3f} | {finals} | {r['exploits']} | {r['wall_s']:.0f} s |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"preset": args.preset, "space": args.space, "steps": steps, "machine": machine(), "results": results}
    (out / f"pbt_vs_random_{args.preset}.json").write_text(json.dumps(payload, indent=2))
    (out / f"pbt_vs_random_{args.preset}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
