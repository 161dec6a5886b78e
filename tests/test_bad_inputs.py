"""A corpus of bad inputs, each given to the CLI as a user would: configs, flags, checkpoints, data, tune spaces
and paths. Every one must end before any work starts with exit code 2 and one line on stderr naming the culprit
(the key, flag, file or value), never a traceback. The CLI runs in this process (``cli.main``): a case that slipped
through would go on to connect to ``ray.address``, set here to a closed port so it fails fast and visibly."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hdebm_ray.cli import main as cli
from hdebm_ray.config import load_config
from hdebm_ray.data.convert import write_parquet_shards
from hdebm_ray.data.datasets import build_dataset
from hdebm_ray.io.checkpoint import CheckpointError, load_config_of
from hdebm_ray.training.runner import run_in_process

NOWHERE = [
    "--set",
    "ray.address=127.0.0.1:1",
    "--set",
    "ray.connect_timeout_s=0.5",
    "--set",
    "run.storage_path={root}/runs",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints (good, truncated, pickled), data folders (empty, garbage shards, a shard set), space files."""
    root = tmp_path_factory.mktemp("bad")
    cfg = load_config("toy2d", overrides=["mebm.steps=2", "mebm.report_every=1", "mebm.checkpoint_every=2"])
    _, good = run_in_process(cfg.replace(**{"mebm.buffer_size": 256, "mebm.batch_size": 64}), "mebm", root / "run")
    truncated = shutil.copytree(good, root / "truncated")
    (truncated / "energy.pt").write_bytes((truncated / "energy.pt").read_bytes()[:-50])
    pickled = shutil.copytree(good, root / "pickled")
    torch.save({"obj": argparse.Namespace(x=1)}, pickled / "chain_init.pt")
    (pickled / "meta.json").write_text((pickled / "meta.json").read_text().replace('"files"', '"unlisted"'))
    (root / "empty").mkdir()
    (root / "garbage").mkdir()
    (root / "garbage" / "part-0.parquet").write_bytes(b"PAR1 nope")
    write_parquet_shards(build_dataset(load_config("digits")), str(root / "shards"), shard_size=1000)
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("stage1: {steps: [\n")
    spaces = {
        "int_uniform": "stage: stage1\nmetric: Energy/abs_gap\nparams:\n  stage1.langevin.steps: {uniform: [5, 20]}\n",
        "corner": "stage: stage1\nmetric: Energy/abs_gap\nparams:\n  stage1.batch_size: {choice: [32, 128]}\n"
        "  stage1.bank_size: {choice: [64, 512]}\n",
        "unknown_key": "stage: stage1\nmetric: m\nparams:\n  stage1.nope: {choice: [1]}\n",
        "log0": "stage: stage1\nmetric: m\nparams:\n  stage1.lr_energy: {loguniform: [0, 1.0e-3]}\n",
        "no_metric": "stage: stage1\nparams:\n  stage1.lr_energy: {choice: [1.0e-4]}\n",
        "yaml": "stage: [\n",
        "section": "stage: stage1\nmetric: m\nparams:\n  stage1.langevin: {choice: [1]}\n",
        "odd": "stage: stage1\nmetric: Energy/abs_gap\nparams:\n  stage1.batch_size: {choice: [63, 64]}\n",
    }
    for name, text in spaces.items():
        (root / f"space_{name}.yaml").write_text(text)
    # checkpoints: of a stage nobody knows, weights that do not fit their own config, an unreadable meta.json
    unknown = shutil.copytree(good, root / "unknown_stage")
    (unknown / "meta.json").write_text((unknown / "meta.json").read_text().replace('"mebm"', '"stage9"'))
    misfit = shutil.copytree(good, root / "misfit")
    (misfit / "config.yaml").write_text(load_config_of(good).replace(**{"network.energy.width": 7}).to_yaml())
    bad_meta = shutil.copytree(good, root / "bad_meta")
    (bad_meta / "meta.json").write_text('{"step": 2,')
    diff_cfg = load_config("toy2d", overrides=["diffusion.steps=1", "diffusion.report_every=1"])
    _, diffusion = run_in_process(diff_cfg.replace(**{"diffusion.checkpoint_every": 1}), "diffusion", root / "diff")
    # data: an image column of numbers
    (root / "numbers").mkdir()
    pq.write_table(pa.table({"image": pa.array([1, 2, 3])}), root / "numbers" / "part-0.parquet")
    (root / "afile").write_text("x")
    (root / "taken.png").write_bytes(b"mine")
    (root / "dump.yaml").write_text(load_config("toy2d").to_yaml())
    # run-state files a crash or a hand truncated, a run another live driver owns, a run whose checkpoint's
    # weights this config cannot load
    runs = root / "runs"
    for run, name, text in [
        ("st", "pipeline.json", '{"diffusion": '),
        ("rj", "run.json", '{"run_id": '),
        ("ow", "owner.json", '{"tok'),
        ("gd", "mebm/guard.json", '{"roll'),
        ("dv", "mebm/divergence.json", '{"st'),
    ]:
        (runs / run / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / run / name).write_text(text)
    now = time.time()
    owner = {"token": "t", "host": socket.gethostname(), "pid": os.getpid(), "job_id": "", "started_at": now}
    (runs / "live").mkdir()
    (runs / "live" / "owner.json").write_text(json.dumps({**owner, "heartbeat_at": now + 3600}))
    shutil.copytree(good, runs / "resumed" / "mebm" / good.name)
    return {
        "root": root,
        "good": good,
        "truncated": truncated,
        "pickled": pickled,
        "unknown": unknown,
        "misfit": misfit,
        "bad_meta": bad_meta,
        "diffusion": diffusion,
    }


def P(*args):  # a pipeline run on digits that must not start
    return ["pipeline", "--preset", "digits", *NOWHERE, *args]


def T(stage, *args):  # a training run of one stage that must not start
    return ["train", "--preset", "digits", "--stage", stage, *NOWHERE, *args]


def S(*kv):
    return [a for pair in kv for a in ("--set", pair)]


# (case id, argv with {root}/{good}/... placeholders, what the message must name)
CASES = [
    # -- config keys
    ("unknown key", P(*S("stage1.nope=1")), "stage1.nope"),
    ("unknown section", P(*S("stage9.steps=1")), "stage9"),
    ("wrong type", P(*S("stage1.steps=abc")), "stage1.steps"),
    ("float for int", P(*S("stage1.steps=2.5")), "stage1.steps"),
    ("out of range", P(*S("stage1.langevin.step_size=-1")), "stage1.langevin.step_size"),
    ("open lower bound", P(*S("guard.backoff=0")), "guard.backoff"),
    ("bool junk", P(*S("ray.use_gpu=maybe")), "ray.use_gpu"),
    ("bad choice", P(*S("compute.precision=fp8")), "compute.precision"),
    ("guard choice", P(*S("guard.backoff_applies_to=all")), "guard.backoff_applies_to"),
    ("data choice", P(*S("data.dataset=imagenet")), "data.dataset"),
    ("verify choice", P(*S("data.verify=some")), "data.verify"),
    ("zero workers", P(*S("ray.num_workers=0")), "ray.num_workers"),
    ("fp16 on cpu", P(*S("compute.precision=fp16")), "compute.precision"),
    ("run name escapes", P(*S("run.name=../../x")), "run.name"),
    ("run name empty", P(*S("run.name=")), "run.name"),
    ("run name nested", P(*S("run.name=a/b")), "run.name"),
    ("run name dot", P(*S("run.name=..")), "run.name"),
    ("bank below batch", P(*S("stage1.bank_size=8")), "stage1.bank_size"),
    ("batch not divisible", P(*S("stage1.batch_size=63")), "stage1.batch_size"),
    ("checkpoint not on report", P(*S("stage1.checkpoint_every=7")), "stage1.checkpoint_every"),
    ("truncation past T", P(*S("diffusion.T_trunc=5000")), "diffusion.T_trunc"),
    ("n0 not power of two", P(*S("distill.n0_steps=3")), "distill.n0_steps"),
    ("buffer below batch", T("mebm", *S("mebm.buffer_size=8")), "mebm.buffer_size"),
    ("no equals", P("--set", "stage1.steps"), "--set"),
    ("unknown preset", ["pipeline", "--preset", "nope", *NOWHERE], "nope"),
    ("missing config file", P("--config", "{root}/none.yaml"), "none.yaml"),
    ("config file not a mapping", P("--config", "{root}/list.yaml"), "list.yaml"),
    ("config file bad yaml", P("--config", "{root}/broken.yaml"), "broken.yaml"),
    ("unknown stage list", P("--stages", "diffusion,foo"), "foo"),
    ("augment for vectors", T("mebm", *S("data.dataset=toy2d", "mebm.augment=[flip]")), "mebm.augment"),
    ("unreachable cluster", T("diffusion"), "ray.address"),
    # -- flags
    ("sample n 0", ["sample", "--checkpoint", "{good}", "--n", "0", "--out", "{root}/x.png"], "--n"),
    ("sample n text", ["sample", "--checkpoint", "{good}", "--n", "many", "--out", "{root}/x.png"], "--n"),
    ("sample device", ["sample", "--checkpoint", "{good}", "--out", "{root}/x.png", "--device", "banana"], "--device"),
    ("sample cuda", ["sample", "--checkpoint", "{good}", "--out", "{root}/x.png", "--device", "cuda:7"], "--device"),
    ("enfe batches 0", ["enfe", "--checkpoint", "{good}", "--batches", "0"], "--batches"),
    ("enfe batch size", ["enfe", "--checkpoint", "{good}", "--batch-size", "-1"], "--batch-size"),
    ("enfe reference", ["enfe", "--checkpoint", "{good}", "--reference", "{root}/none"], "--reference"),
    ("eval n negative", ["eval", "--checkpoint", "{good}", "--n", "-5"], "--n"),
    ("eval n one", ["eval", "--checkpoint", "{good}", "--n", "1"], "--n"),
    ("eval both targets", ["eval", "--checkpoint", "{good}", "--run", "{root}"], "--run"),
    ("eval no run", ["eval", "--run", "{root}/none"], "--run"),
    ("ood n 0", ["ood", "--checkpoint", "{good}", "--out", "uniform", "--n", "0"], "--n"),
    (
        "convert shard size",
        ["dataset", "convert", "--source", "digits", "--out", "{root}/o", "--shard-size", "0"],
        "--shard-size",
    ),
    (
        "convert channels",
        ["dataset", "convert", "--source", "digits", "--out", "{root}/o", "--channels", "2"],
        "--channels",
    ),
    (
        "convert resolution",
        ["dataset", "convert", "--source", "digits", "--out", "{root}/o", "--resolution", "0"],
        "--resolution",
    ),
    (
        "tune samples",
        ["tune", "--preset", "digits", "--space", "tune_spaces/stage1.yaml", "--samples", "0"],
        "--samples",
    ),
    (
        "tune concurrency",
        ["tune", "--preset", "digits", "--space", "tune_spaces/stage1.yaml", "--max-concurrent", "0"],
        "--max-concurrent",
    ),
    (
        "tune cpus",
        ["tune", "--preset", "digits", "--space", "tune_spaces/stage1.yaml", "--cpus-per-worker", "0"],
        "--cpus-per-worker",
    ),
    (
        "pbt on the eval pool's FID",
        [
            "tune",
            "--preset",
            "digits",
            "--space",
            "tune_spaces/stage1.yaml",
            "--scheduler",
            "pbt",
            "--metric",
            "Eval/fid",
        ],
        "Eval/fid",
    ),
    ("unknown stage", ["train", "--preset", "digits", "--stage", "stage9"], "--stage"),
    ("no stage", ["train", "--preset", "digits"], "--stage"),
    # -- checkpoints
    ("missing checkpoint", ["sample", "--checkpoint", "{root}/none", "--out", "{root}/x.png"], "none"),
    ("folder not a checkpoint", ["sample", "--checkpoint", "{root}/empty", "--out", "{root}/x.png"], "empty"),
    ("truncated checkpoint", ["sample", "--checkpoint", "{truncated}", "--out", "{root}/x.png"], "energy.pt"),
    ("pickled payload", ["sample", "--checkpoint", "{pickled}", "--out", "{root}/x.png"], "chain_init.pt"),
    ("init-from missing", T("stage1", "--init-from", "{root}/none"), "--init-from"),
    ("init-from truncated", T("stage1", "--init-from", "{truncated}"), "--init-from"),
    ("no parent stage", T("stage2", *S("run.storage_path={root}/runs", "run.name=fresh")), "stage1"),
    # -- data
    ("folder missing", T("mebm", *S("data.dataset=image_folder", "data.path={root}/none")), "none"),
    ("folder empty", T("mebm", *S("data.dataset=image_folder", "data.path={root}/empty")), "empty"),
    ("no path", T("mebm", *S("data.dataset=image_folder", "data.path=")), "data.path"),
    ("no shards", T("mebm", *S("data.dataset=parquet", "data.path={root}/empty")), "empty"),
    ("garbage shard", T("mebm", *S("data.dataset=parquet", "data.path={root}/garbage")), "part-0.parquet"),
    (
        "convert missing source",
        ["dataset", "convert", "--source", "image_folder", "--in", "{root}/none", "--out", "{root}/o"],
        "none",
    ),
    ("convert over shards", ["dataset", "convert", "--source", "digits", "--out", "{root}/shards"], "--overwrite"),
    (
        "convert into source",
        [
            "dataset",
            "convert",
            "--source",
            "parquet",
            "--in",
            "{root}/shards",
            "--out",
            "{root}/shards/x",
            "--overwrite",
        ],
        "overlap",
    ),
    # -- tune spaces
    ("space missing", ["tune", "--preset", "digits", "--space", "{root}/none.yaml"], "none.yaml"),
    (
        "space int uniform",
        ["tune", "--preset", "digits", "--space", "{root}/space_int_uniform.yaml"],
        "stage1.langevin.steps",
    ),
    ("space corner", ["tune", "--preset", "digits", "--space", "{root}/space_corner.yaml"], "stage1.bank_size"),
    ("space unknown key", ["tune", "--preset", "digits", "--space", "{root}/space_unknown_key.yaml"], "stage1.nope"),
    ("space loguniform 0", ["tune", "--preset", "digits", "--space", "{root}/space_log0.yaml"], "loguniform"),
    ("space no metric", ["tune", "--preset", "digits", "--space", "{root}/space_no_metric.yaml"], "metric"),
    ("space yaml", ["tune", "--preset", "digits", "--space", "{root}/space_yaml.yaml"], "YAML"),
    ("space section", ["tune", "--preset", "digits", "--space", "{root}/space_section.yaml"], "stage1.langevin"),
    ("space batch not divisible", ["tune", "--preset", "digits", "--space", "{root}/space_odd.yaml"], "batch_size"),
    # -- sizes and resources no run can hold (refused by --dry-run too; resources against this machine: an embedded Ray)
    ("steps 1e30", P("--dry-run", *S("ray.address=", "stage1.steps=1000000000000000000000000000000")), "stage1.steps"),
    (
        "step size 1e300",
        P("--dry-run", *S("ray.address=", "stage1.langevin.step_size=1e300")),
        "stage1.langevin.step_size",
    ),
    ("timeout 1e300", P("--dry-run", *S("ray.address=", "eval.timeout_s=1e300")), "eval.timeout_s"),
    ("bank of 1e12", P("--dry-run", *S("ray.address=", "stage1.bank_size=1000000000")), "stage1.bank_size"),
    ("buffer of 1e9", T("mebm", "--dry-run", *S("ray.address=", "mebm.buffer_size=1000000000")), "mebm.buffer_size"),
    ("1e9 CPUs", P("--dry-run", *S("ray.address=", "ray.cpus_per_worker=1e9")), "ray.cpus_per_worker"),
    ("1e5 eval actors", P("--dry-run", *S("ray.address=", "eval.actors=100000")), "eval.actors"),
    ("UNet of 1e8 channels", P("--dry-run", *S("ray.address=", "network.unet.channels=100000000")), "network.*"),
    ("100 GPUs per eval actor", P("--dry-run", *S("ray.address=", "eval.gpus_per_actor=100")), "eval.gpus_per_actor"),
    # -- what the real run refuses, refused by --dry-run first
    ("dry run without a parent", T("stage1", "--dry-run", *S("run.name=fresh")), "--init-from"),
    ("dry run image augment", T("mebm", "--dry-run", *S("mebm.augment=[jitter]")), "mebm.augment"),
    ("preset over a full config", P("--dry-run", "--config", "{root}/dump.yaml"), "--preset digits"),
    ("storage path is a file", P("--dry-run", *S("run.storage_path={root}/afile")), "run.storage_path"),
    ("resume misfit weights", T("mebm", "--dry-run", *S("run.name=resumed")), "energy.pt"),
    # -- run-state files: truncated, or owned by a live driver
    ("pipeline.json truncated", P("--dry-run", *S("run.name=st")), "pipeline.json"),
    ("run.json truncated", P("--dry-run", *S("run.name=rj")), "run.json"),
    ("owner.json truncated", P("--dry-run", *S("run.name=ow")), "owner.json"),
    ("guard.json truncated", T("mebm", "--dry-run", *S("run.name=gd")), "guard.json"),
    ("divergence.json truncated", T("mebm", "--dry-run", *S("run.name=dv")), "divergence.json"),
    ("run in use", P("--dry-run", *S("run.name=live")), "in use by another driver"),
    # -- outputs and checkpoints
    ("sample out is a folder", ["sample", "--checkpoint", "{good}", "--out", "{root}/empty"], "--out"),
    ("sample out under a file", ["sample", "--checkpoint", "{good}", "--out", "{root}/afile/x.png"], "afile"),
    ("sample out extension", ["sample", "--checkpoint", "{good}", "--out", "{root}/x.xyz"], ".xyz"),
    ("sample out exists", ["sample", "--checkpoint", "{good}", "--out", "{root}/taken.png"], "--overwrite"),
    ("checkpoint of unknown stage", ["sample", "--checkpoint", "{unknown}", "--out", "{root}/x.png"], "stage9"),
    ("weights misfit their config", ["sample", "--checkpoint", "{misfit}", "--out", "{root}/x.png"], "misfit"),
    ("meta.json truncated", ["sample", "--checkpoint", "{bad_meta}", "--out", "{root}/x.png"], "meta.json"),
    ("enfe steps not dividing", ["enfe", "--checkpoint", "{diffusion}", "--diffusion-steps-timed", "7"], "timed 7"),
    ("image column of numbers", T("mebm", *S("data.dataset=parquet", "data.path={root}/numbers")), "int64"),
]


@pytest.mark.parametrize("argv, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_naming_it_before_any_work(files, argv, culprit, capsys):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "error" in lines[0], err
    assert culprit.format(**{k: str(v) for k, v in files.items()}) in lines[0], lines[0]
    assert not (files["root"] / "x.png").exists() and (files["root"] / "taken.png").read_bytes() == b"mine"


def test_the_corpus_covers_every_family_with_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_eval_of_a_checkpoint_outside_a_run_writes_beside_it_never_above(files, tmp_path):
    loose = shutil.copytree(files["good"], tmp_path / "loose" / "ck")
    argv = ["eval", "--checkpoint", str(loose), "--n", "64", "--device", "cpu", "--protocol", "fresh"]
    assert cli.main(argv + ["--set", "eval.features=raw", "--set", "eval.kid_subsets=2"]) == 0
    assert (loose / "eval" / "eval.jsonl").is_file() and (loose / "eval" / "tb" / "mebm").is_dir()
    assert sorted(p.name for p in (tmp_path / "loose").iterdir()) == ["ck"]  # nothing two levels up


@pytest.mark.parametrize("stage", ["mebm", "mjem"])
def test_the_resume_check_passes_what_a_run_of_the_stage_writes(stage, tmp_path):
    """--dry-run's weight check on a run's own newest checkpoint, for stages whose network depends on the data
    (M-JEM's classifier head: toy2d's 25 modes, not a default 10)."""
    from hdebm_ray.cli.preflight import check_run_state

    cfg = load_config("toy2d", overrides=[f"run.storage_path={tmp_path}", "run.name=r", f"{stage}.steps=2",
                                           f"{stage}.report_every=1", f"{stage}.checkpoint_every=2",
                                           f"{stage}.buffer_size=256", f"{stage}.batch_size=64"])  # fmt: skip
    run_in_process(cfg, stage, tmp_path / "r" / stage)
    check_run_state(cfg, [stage], str(tmp_path / "r"))  # raises on a misfit
    misfit = cfg.replace(**{"network.energy.width": 7})
    with pytest.raises(CheckpointError, match="does not fit this config's network"):
        check_run_state(misfit, [stage], str(tmp_path / "r"))
