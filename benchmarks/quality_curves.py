"""FID against minutes for every method, across the quality benchmark's runs at different budgets: one SVG chart
(reference FID and held-out FID, log scale) and one markdown table, from ``benchmarks/results/quality_*.json``.

    python benchmarks/quality_curves.py digits:hdebm digits_tuned digits_16min_tuned digits_16min:icd \\
        digits_24min_tuned --name digits_curves

Each argument is a run's name (``quality_<name>.json``), optionally with ``:method,method`` to take only those
methods from it (a run that kept another run's rows, or used a preset since replaced). No dependencies beyond the
standard library: the chart is written as SVG by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# one colour per curve kind, one dash pattern per run
COLOURS = {
    ("hdebm", "stage1"): "#1f77b4",
    ("hdebm", "stage2"): "#d62728",
    ("mjem", "mjem"): "#2ca02c",
    ("mebm", "mebm"): "#ff7f0e",
    ("icd", "icd"): "#9467bd",
}
DASHES = ["", "9,4", "3,3", "12,4,3,4", "1,4"]
PANEL_W, PANEL_H, MARGIN = 560, 440, 60
Y_TICKS = [2, 5, 10, 20, 50, 100, 200, 500]


def load_runs(specs: list[str], results: Path) -> list[tuple[str, list[dict]]]:
    runs = []
    for spec in specs:
        name, _, methods = spec.partition(":")
        path = results / f"quality_{name}.json"
        if not path.is_file():
            raise SystemExit(f"quality_curves: no results '{path}' (run benchmarks/quality.py --name {name})")
        rows = json.loads(path.read_text())["checkpoints"]
        if methods:
            rows = [r for r in rows if r["method"] in methods.split(",")]
        runs.append((name, sorted(rows, key=lambda r: (r["method"], r["stage"], r["minute"], r["step"]))))
    return runs


def series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["method"], r["stage"]), []).append(r)
    return out


def panel(runs, key: str, title: str, x0: float, max_minute: float, y_lo: float, y_hi: float) -> list[str]:
    """One chart of ``key`` (a FID column) against minutes; its SVG elements."""

    def px(minute):
        return x0 + MARGIN + minute / max_minute * (PANEL_W - 1.5 * MARGIN)

    def py(fid):
        frac = (math.log10(max(fid, y_lo)) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        return PANEL_H - MARGIN - frac * (PANEL_H - 2 * MARGIN)

    out = [f'<text x="{x0 + PANEL_W / 2}" y="24" text-anchor="middle" font-size="16">{title}</text>']
    left, right, bottom, top = px(0), px(max_minute), py(y_lo), py(y_hi)
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#444"/>')
    for m in range(0, int(max_minute) + 1, 4):
        out.append(f'<line x1="{px(m)}" y1="{top}" x2="{px(m)}" y2="{bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{px(m)}" y="{bottom + 18}" text-anchor="middle" font-size="12">{m}</text>')
    for t in (t for t in Y_TICKS if y_lo <= t <= y_hi):
        out.append(f'<line x1="{left}" y1="{py(t)}" x2="{right}" y2="{py(t)}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4}" text-anchor="end" font-size="12">{t}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 38}" text-anchor="middle" font-size="13">minutes</text>')
    for i, (_, rows) in enumerate(runs):
        for kind, points in series(rows).items():
            colour, dash = COLOURS.get(kind, "#000"), DASHES[i % len(DASHES)]
            path = " ".join(f"{px(r['minute']):.1f},{py(r[key]):.1f}" for r in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" '
                       f'stroke-dasharray="{dash}"/>')  # fmt: skip
            out += [f'<circle cx="{px(r["minute"]):.1f}" cy="{py(r[key]):.1f}" r="3" fill="{colour}"/>' for r in points]
    return out


def svg(runs) -> str:
    rows = [r for _, rs in runs for r in rs]
    max_minute = 4 * math.ceil(max(r["minute"] for r in rows) / 4)
    fids = [r[k] for r in rows for k in ("fid", "fid_held_out")]
    y_lo = max([t for t in [1, *Y_TICKS] if t <= min(fids)], default=min(fids))
    y_hi = min([t for t in [*Y_TICKS, 1000] if t >= max(fids)], default=max(fids))
    width, legend_h = 2 * PANEL_W, 30 + 20 * max(len(COLOURS), len(runs))
    body = panel(runs, "fid", "FID against the reference split", 0, max_minute, y_lo, y_hi)
    body += panel(runs, "fid_held_out", "FID against the held-out split", PANEL_W, max_minute, y_lo, y_hi)
    y = PANEL_H + 10

    def key(x, row, colour, dash, width, label):
        top = y + 20 * row
        return (
            f'<line x1="{x}" y1="{top}" x2="{x + 30}" y2="{top}" stroke="{colour}" stroke-width="{width}" '
            f'stroke-dasharray="{dash}"/><text x="{x + 38}" y="{top + 4}" font-size="13">{label}</text>'
        )

    for j, ((method, stage), colour) in enumerate(COLOURS.items()):
        body.append(key(MARGIN, j, colour, "", 3, f"{method} {stage}" if method == "hdebm" else method))
    for i, (name, _) in enumerate(runs):
        body.append(key(PANEL_W + MARGIN, i, "#333", DASHES[i % len(DASHES)], 2, f"run {name}"))
    height = PANEL_H + legend_h
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f'<rect width="{width}" height="{height}" fill="white"/>' + "".join(body) + "</svg>\n"
    )


def markdown(runs, specs: list[str]) -> str:
    lines = [
        "# FID against minutes, every method and run (`benchmarks/quality_curves.py`)",
        "",
        f"Runs: {', '.join(f'`{s}`' for s in specs)}. Chart: the `.svg` beside this file (log scale).",
        "",
        "| run | method | stage | step | min | FID | held-out FID |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in runs:
        lines += [
            f"| {name} | {r['method']} | {r['stage']} | {r['step']} | {r['minute']:.1f} | {r['fid']:.2f} | "
            f"{r['fid_held_out']:.2f} |"
            for r in rows
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run names (quality_<name>.json), each optionally name:method,method")
    p.add_argument("--name", default="digits_curves", help="writes quality_<name>.md and .svg")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    results = Path(args.results)
    runs = load_runs(args.runs, results)
    (results / f"quality_{args.name}.svg").write_text(svg(runs))
    (results / f"quality_{args.name}.md").write_text(markdown(runs, args.runs))
    print(f"wrote {results / f'quality_{args.name}.svg'} and .md ({sum(len(r) for _, r in runs)} checkpoints)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
