"""Saved state that cannot be trusted is never used, and never stops a run for good: checkpoints verified against
the sizes their meta.json lists (written last), pickled payloads refused with our message, checkpoints written
under a temporary name in process, an incomplete newest checkpoint passed over on resume, and a corrupt line of
eval.jsonl reported by number and skipped. (The bank snapshots' fallback is in test_bank.)"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hdebm_ray.config import load_config
from hdebm_ray.evaluation.results import append_jsonl, read_results
from hdebm_ray.io.checkpoint import (
    CheckpointError,
    incomplete,
    latest_checkpoint,
    load_states,
    run_checkpoints,
    save_checkpoint,
)
from hdebm_ray.training.runner import run_in_process

TOY_MEBM = [
    "mebm.steps=8",
    "mebm.report_every=2",
    "mebm.checkpoint_every=2",
    "mebm.buffer_size=128",
    "mebm.batch_size=64",
]


def test_checkpoints_are_verified_against_their_meta_and_pickles_refused(tmp_path):
    cfg = load_config("toy2d")
    d = save_checkpoint(tmp_path / "ck", {"energy": {"w": torch.ones(100)}}, cfg, {"step": 3})
    meta = json.loads((d / "meta.json").read_text())
    assert meta["files"] == {"energy.pt": (d / "energy.pt").stat().st_size} and incomplete(d) is None
    assert torch.equal(load_states(d)["energy"]["w"], torch.ones(100))
    data = (d / "energy.pt").read_bytes()
    (d / "energy.pt").write_bytes(data[:-100])
    assert "energy.pt has" in incomplete(d)
    with pytest.raises(CheckpointError, match=r"incomplete: energy\.pt has \d+ bytes, meta\.json says"):
        load_states(d)
    (d / "meta.json").unlink()
    assert incomplete(d) == "it has no meta.json"
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_states(d)  # no meta to check against: torch's own error, named
    # a payload that needs unpickling objects: refused, in our words, not torch's advice to turn weights_only off
    torch.save({"w": torch.ones(2), "obj": argparse.Namespace(x=1)}, d / "energy.pt")
    with pytest.raises(CheckpointError, match="holds pickled Python objects") as refused:
        load_states(d)
    assert "weights_only=False" not in str(refused.value)


def test_resume_passes_over_an_incomplete_newest_checkpoint_and_evaluation_ignores_it(tmp_path):
    cfg = load_config("toy2d", overrides=TOY_MEBM)
    out = tmp_path / "run" / "mebm"
    run_in_process(cfg, "mebm", out)
    assert not list(out.glob(".*tmp"))  # written under temporary names, renamed
    newest = out / "checkpoint_00000008"
    (newest / "energy.pt").write_bytes(b"cut")
    assert latest_checkpoint(out).name == "checkpoint_00000006"
    assert [p.rsplit("/", 1)[1] for p in run_checkpoints(str(tmp_path / "run"), ["mebm"])][-1] == "checkpoint_00000006"
    stage, last = run_in_process(cfg, "mebm", out)  # redoes steps 7-8 from step 6 and its buffer
    assert last.name == "checkpoint_00000008" and incomplete(last) is None
    assert stage.ctx.bank.service.loaded_snapshot_step == 6


def test_only_checkpoints_ray_train_registered_count_where_it_keeps_a_record(tmp_path):
    """A driver killed between writing a checkpoint and Ray registering it leaves a complete but unregistered
    folder, superseded when the run resumes: it is neither evaluated nor resumed from."""
    import json

    cfg = load_config("toy2d")
    stage = tmp_path / "run" / "stage1"
    for name, step in (("checkpoint_00000006_1", 6), ("checkpoint_00000008_1", 8), ("checkpoint_00000008_2", 8)):
        save_checkpoint(stage / name, {"energy": {"w": torch.ones(3)}}, cfg, {"step": step})
    names = lambda: [p.rsplit("/", 1)[1] for p in run_checkpoints(str(tmp_path / "run"), ["stage1"])]  # noqa: E731
    assert names() == ["checkpoint_00000006_1", "checkpoint_00000008_1", "checkpoint_00000008_2"]  # no record
    registry = {
        "checkpoint_results": [{"checkpoint_dir_name": n} for n in ("checkpoint_00000006_1", "checkpoint_00000008_2")]
    }
    (stage / "checkpoint_manager_snapshot.json").write_text(json.dumps(registry))
    assert names() == ["checkpoint_00000006_1", "checkpoint_00000008_2"]


def test_a_corrupt_result_line_is_reported_by_number_and_skipped(tmp_path, capsys):
    path = tmp_path / "eval.jsonl"
    append_jsonl(path, {"checkpoint": "a", "fid": 1.0})
    with open(path, "a") as f:
        f.write('{"checkpoint": "b", "fi')  # half a line, as a killed writer of another tool leaves it
    append_jsonl(path, {"checkpoint": "c", "fid": 3.0})
    assert [r["checkpoint"] for r in read_results(str(tmp_path))] == ["a", "c"]
    assert "eval.jsonl line 2 is not a JSON result; skipped" in capsys.readouterr().err
