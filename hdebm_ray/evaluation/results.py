"""The run's evaluation record: ``<run>/eval.jsonl`` (one JSON result per evaluated checkpoint), the eval
TensorBoard scalars beside the training ones, and which checkpoints a run has and which are scored already."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ..io import storage
from ..io.storage import staged_output
from ..stages import PIPELINE

# What an evaluation scores, each also of the chain starts alone (``<key>_generator`` / ``<key>_init``) but IS.
SCORES = ("fid", "kid", "precision", "recall")
SCORED = SCORES + ("is",) + tuple(f"{key}_{start}" for start in ("generator", "init") for key in SCORES)


def scores_text(result: dict) -> str:
    """'FID x  KID y  P p  R r  IS i' with what the result has."""
    text = f"FID {result['fid']:.4g}  KID {result['kid']:.4g}"
    if "precision" in result:
        text += f"  P {result['precision']:.3f}  R {result['recall']:.3f}"
    if "is" in result:
        text += f"  IS {result['is']:.3g}"
    return text


def start_note(result: dict) -> str:
    """', generator alone FID x' (or 'chain init alone') for a result that has one, else ''."""
    for start, label in (("generator", "generator alone"), ("init", "chain init alone")):
        if f"fid_{start}" in result:
            return f", {label} FID {result[f'fid_{start}']:.4g}"
    return ""


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line (the whole file rewritten under a temporary name and moved: readers never see half a
    line). A last line without its newline (cut short by hand or by another tool) is ended first."""
    text = storage.read_text(str(path)) if storage.exists(str(path)) else ""
    if text and not text.endswith("\n"):
        text += "\n"
    storage.write_text(str(path), text + json.dumps(record, sort_keys=True) + "\n")


def record(run_location: str, result: dict) -> None:
    """Append to ``<run>/eval.jsonl`` and log ``Eval/*`` (FID, KID, precision, recall, IS; those of the chain starts)
    at the checkpoint's images seen."""
    append_jsonl(f"{run_location}/eval.jsonl", result)
    # events go to a local directory (uploaded afterwards when the run lives under a URI)
    with staged_output(f"{run_location}/tb/{result['stage']}") as local:
        with SummaryWriter(log_dir=str(local), filename_suffix=".eval") as writer:
            suffix = "" if result.get("default_sampler", True) else f"_{result['protocol']}_{result['weights']}"
            for key in SCORED:
                if key in result:
                    writer.add_scalar(f"Eval/{key}{suffix}", result[key], result["nimg"])


_WARNED: set[tuple[str, int]] = set()


def read_results(run_location: str) -> list[dict]:
    """Every result in ``<run>/eval.jsonl`` (empty if none)."""
    path = f"{run_location}/eval.jsonl"
    if not storage.exists(path):
        return []
    results = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            result = json.loads(line)
            if not isinstance(result, dict) or "checkpoint" not in result:
                raise ValueError("not a result")
        except ValueError:  # a corrupt line must not block every later evaluation of the run
            if (path, number) not in _WARNED:  # once per process: the pool reads the file at every result
                _WARNED.add((path, number))
                print(f"[eval] {path} line {number} is not a JSON result; skipped", file=sys.stderr, flush=True)
            continue
        results.append(result)
    return results


def evaluated(run_location: str, protocol: str | None = None, weights: str | None = None) -> set[str]:
    """Checkpoint paths that already have a result in ``<run>/eval.jsonl`` (with that protocol / those weights,
    when given)."""
    return {
        r["checkpoint"]
        for r in read_results(run_location)
        if protocol in (None, r.get("protocol")) and weights in (None, r.get("weights"))
    }


def print_eval_table(run_location: str) -> None:
    """The run's scores so far, one line per scored checkpoint (from ``<run>/eval.jsonl``)."""
    results = read_results(run_location)
    if not results:
        return
    print(f"[eval] {len(results)} checkpoint(s) scored ({results[0]['features']} features):", flush=True)
    for r in sorted(results, key=lambda r: (PIPELINE.index(r["stage"]) if r["stage"] in PIPELINE else 99, r["step"])):
        scored = f" [{r.get('weights', 'raw')} weights, {r.get('protocol', 'fresh')}]"
        print(f"  {r['stage']:>9} step {r['step']:>7}: {scores_text(r)}{start_note(r)}{scored}", flush=True)
