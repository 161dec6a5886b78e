"""A corpus of bad inputs, each given to the CLI as a user would: configs, flags, checkpoints, data, tune spaces
and paths. Every one must end before any work starts with exit code 2 and one line on stderr naming the culprit
(the key, flag, file or value), never a traceback. The CLI runs in this process (``cli.main``): a case that slipped
through would go on to connect to ``ray.address``, set here to a closed port so it fails fast and visibly."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from hdebm_ray.cli import main as cli
from hdebm_ray.config import load_config
from hdebm_ray.data.convert import write_parquet_shards
from hdebm_ray.data.datasets import build_dataset
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
    }
    for name, text in spaces.items():
        (root / f"space_{name}.yaml").write_text(text)
    return {"root": root, "good": good, "truncated": truncated, "pickled": pickled}


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
    assert not (files["root"] / "x.png").exists()


def test_the_corpus_covers_every_family_with_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_eval_of_a_checkpoint_outside_a_run_writes_beside_it_never_above(files, tmp_path):
    loose = shutil.copytree(files["good"], tmp_path / "loose" / "ck")
    argv = ["eval", "--checkpoint", str(loose), "--n", "64", "--device", "cpu", "--protocol", "fresh"]
    assert cli.main(argv + ["--set", "eval.features=raw", "--set", "eval.kid_subsets=2"]) == 0
    assert (loose / "eval" / "eval.jsonl").is_file() and (loose / "eval" / "tb" / "mebm").is_dir()
    assert sorted(p.name for p in (tmp_path / "loose").iterdir()) == ["ck"]  # nothing two levels up
