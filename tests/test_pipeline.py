"""The run's life cycle in the core, without Ray: HDEBM's pipeline through ``training.pipeline`` with the in-process
fit (pipeline.json, finished stages skipped, a missing parent named), checkpoints of releases before 0.2 resumed
under their old component names, and the CLI's small conveniences (a stage folder where a checkpoint is asked for,
presets that say what they are, a plain --help)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdebm_ray.cli.main import main as cli_main
from hdebm_ray.config import ConfigError, load_config
from hdebm_ray.io.checkpoint import checkpoint_or_newest, load_meta, load_states
from hdebm_ray.training.pipeline import STATE_FILE, init_checkpoint, read_state, run_pipeline
from hdebm_ray.training.runner import fit_in_process, run_in_process

SHORT = [
    "diffusion.steps=40",
    "diffusion.report_every=20",
    "diffusion.checkpoint_every=20",
    "distill.n0_steps=2",
    "distill.steps_per_stage=10",
    "distill.report_every=10",
    "distill.checkpoint_every=10",
    "stage1.steps=4",
    "stage1.report_every=2",
    "stage1.checkpoint_every=2",
    "stage2.steps=2",
    "stage2.report_every=1",
    "stage2.checkpoint_every=2",
]


def test_the_core_pipeline_chains_the_stages_records_them_and_skips_what_is_finished(tmp_path, capsys):
    cfg = load_config("toy2d", overrides=[f"run.storage_path={tmp_path}", "run.name=p", *SHORT])
    with pytest.raises(ConfigError, match=r"stage 'stage1' starts from a 'distill' checkpoint: pass --init-from"):
        init_checkpoint(cfg, "stage1")
    fitted = []

    def fit(stage_cfg, stage, init_from):
        fitted.append((stage, init_from))
        return fit_in_process(stage_cfg, stage, init_from)

    state = run_pipeline(cfg, fit)
    run = tmp_path / "p"
    assert [s for s, _ in fitted] == ["diffusion", "distill", "stage1", "stage2"]
    # each stage started from the previous one's final checkpoint, as recorded
    for (_, init_from), parent in zip(fitted[1:], ["diffusion", "distill", "stage1"], strict=True):
        assert init_from == state[parent]["checkpoint"] and load_meta(init_from)["stage"] == parent
    assert json.loads((run / STATE_FILE).read_text()) == read_state(str(run)) == state
    assert load_meta(state["stage2"]["checkpoint"])["done"] and state["stage2"]["step"] == 2
    assert (run / "tb" / "stage1").is_dir()  # the in-process fit logs where the Ray one does
    assert init_checkpoint(cfg, "stage2") == state["stage1"]["checkpoint"]
    # a re-run finds every stage finished (their checkpoints say done) and trains nothing
    capsys.readouterr()
    fitted.clear()
    assert run_pipeline(cfg, fit) == state
    assert fitted == [] and capsys.readouterr().out.count("already finished") == 4
    with pytest.raises(ConfigError, match="--stages: unknown stage 'mebm'"):
        run_pipeline(cfg, fit, ["mebm"])


def test_a_checkpoint_of_an_older_release_resumes_under_its_old_component_names(tmp_path):
    """Before 0.2 the diffusion stage saved optimizer.pt / lr_sched.pt: they load as denoiser_opt / denoiser_sched,
    and resuming from them continues exactly as from a checkpoint with the current names."""
    cfg = load_config("toy2d", overrides=SHORT)
    run_in_process(cfg.replace(**{"diffusion.steps": 20}), "diffusion", tmp_path / "old")
    ckpt = tmp_path / "old" / "checkpoint_00000020"
    (tmp_path / "new").mkdir()
    import shutil

    shutil.copytree(ckpt, tmp_path / "new" / ckpt.name)
    meta = json.loads((ckpt / "meta.json").read_text())
    for new, old in (("denoiser_opt", "optimizer"), ("denoiser_sched", "lr_sched")):
        (ckpt / f"{new}.pt").rename(ckpt / f"{old}.pt")
        meta["files"][f"{old}.pt"] = meta["files"].pop(f"{new}.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert set(load_states(ckpt)) == {"denoiser", "denoiser_opt", "denoiser_sched"}
    _, old_end = run_in_process(cfg, "diffusion", tmp_path / "old")
    _, new_end = run_in_process(cfg, "diffusion", tmp_path / "new")
    a, b = load_states(old_end), load_states(new_end)
    assert load_meta(old_end)["resumed_from_step"] == 20 and int(a["denoiser_opt"]["state"][0]["step"]) == 40
    assert all(torch.equal(v, b["denoiser"][k]) for k, v in a["denoiser"].items())


def test_the_cli_takes_a_stage_folder_for_a_checkpoint_and_says_what_presets_are(tmp_path, capsys):
    cfg = load_config("toy2d", overrides=SHORT)
    run_in_process(cfg, "diffusion", tmp_path / "diffusion")
    # Ray Train's record of its checkpoints lies beside them, named checkpoint_*: it is no checkpoint
    names = [{"checkpoint_dir_name": f"checkpoint_{s:08d}"} for s in (20, 40)]
    (tmp_path / "diffusion" / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": names}))
    assert checkpoint_or_newest(str(tmp_path / "diffusion")).endswith("/diffusion/checkpoint_00000040")
    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "diffusion"), "--n", "16", "--out", str(out)]) == 0
    assert out.is_file() and "wrote 16 diffusion samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a folder without checkpoints is named in one line
        cli_main(["sample", "--checkpoint", str(tmp_path), "--out", str(out)])
    assert "is neither a checkpoint directory" in capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["presets"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert listed["digits"].startswith("CPU preset: scikit-learn's 1797 real handwritten digits")
    assert listed["cifar10"].startswith("HDEBM on CIFAR-10 32x32, the paper's settings")
    help_text = subprocess.run(
        [sys.executable, "-m", "hdebm_ray", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    ).stdout
    assert "``" not in help_text and "Train energy-based image generators" in help_text
