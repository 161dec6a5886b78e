"""Config: presets resolve, overrides apply, and every bad value is rejected naming its key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from hdebm_ray.config import Config, ConfigError, load_config, preset_names


def test_every_preset_resolves():
    assert {"digits"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, Config)


def test_preset_emas_are_shorter_than_their_stages():
    """An EMA whose half-life is most of its stage still holds mostly the starting weights at the end: digits'
    60-step Stage 2 at 5 kimg scored its EMA 16.5 where the raw weights scored 12.5 (classifier FID)."""
    for name in preset_names():
        cfg = load_config(name)
        with_ema = {k: s for k, s in vars(cfg).items() if hasattr(s, "ema_halflife_kimg")}
        assert {"stage1", "stage2", "mebm", "mjem", "icd"} <= set(with_ema)
        for stage, s in with_ema.items():
            assert s.ema_halflife_kimg * 1000 <= 0.5 * s.steps * s.batch_size, (name, stage)


def test_overrides_are_typed_and_layered(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("diffusion:\n  lr: 1e-3\n  steps: 7\n")  # YAML 1.1 reads 1e-3 as a string; we accept it
    cfg = load_config(
        "digits",
        f,
        ["diffusion.steps=9", "network.unet.channel_mult=[1,2]", "stage1.langevin.step_size=2e-3", "ray.use_gpu=false"],
    )
    assert cfg.diffusion.lr == 1e-3 and cfg.diffusion.steps == 9
    assert cfg.network.unet.channel_mult == (1, 2)
    assert cfg.stage1.langevin.step_size == 2e-3 and cfg.ray.use_gpu is False
    # round trip through YAML gives the same config
    assert load_config(config_file=_write(tmp_path / "r.yaml", cfg.to_yaml())) == cfg


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("stage1.langevin.step_size=-0.1", "stage1.langevin.step_size", "> 0"),
        ("stage2.langevin.y_step_size=-1e-4", "stage2.langevin.y_step_size", "> 0"),
        ("stage2.langevin.z1_step_size=0", "stage2.langevin.z1_step_size", "> 0"),
        ("diffusion.T_trunc=1000", "diffusion.T_trunc", "< diffusion.T"),
        ("diffusion.T_trunc=2000", "diffusion.T_trunc", "< diffusion.T"),
        ("stage1.langevin.steps=0", "stage1.langevin.steps", ">= 1"),
        ("stage2.langevin.steps=0", "stage2.langevin.steps", ">= 1"),
        ("diffusion.batch_size=63", "diffusion.batch_size", "divisible by ray.num_workers"),
        ("stage1.batch_size=33", "stage1.batch_size", "divisible by ray.num_workers"),
        ("diffusion.lr=-1", "diffusion.lr", "> 0"),
        ("diffusion.steps=abc", "diffusion.steps", "integer"),
        ("diffusion.steps=1.5", "diffusion.steps", "integer"),
        ("diffusion.lr=fast", "diffusion.lr", "number"),
        ("ray.use_gpu=maybe", "ray.use_gpu", "true or false"),
        ("ray.num_workers=0", "ray.num_workers", ">= 1"),
        ("data.dataset=mnist", "data.dataset", "choose one of"),
        ("data.channels=2", "data.channels", "choose one of"),
        ("data.resolution=24", "data.resolution", "power of two"),
        ("distill.n0_steps=12", "distill.n0_steps", "power of two"),
        ("distill.n0_steps=1024", "distill.n0_steps", "divides diffusion.T_trunc"),
        ("diffusion.checkpoint_every=75", "diffusion.checkpoint_every", "multiple"),
        ("stage1.bank_size=8", "stage1.bank_size", ">= stage1.batch_size"),
        ("network.unet.attn_resolutions=[32]", "network.unet.attn_resolutions", "data.resolution"),
        ("diffusion.lrr=1", "diffusion.lrr", "unknown config key"),
        ("nosection.x=1", "nosection.x", "unknown config key"),
        ("diffusion=3", "diffusion", "mapping"),
    ],
)
def test_bad_values_name_their_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config("digits", overrides=[override])
    msg = str(e.value)
    assert f"'{key}" in msg or f"{key}" in msg.split("'")[1], msg
    assert words in msg, msg


def test_bad_config_file_names_key(tmp_path):
    f = _write(tmp_path / "bad.yaml", "stage1:\n  langevin:\n    stepsize: 1\n")
    with pytest.raises(ConfigError, match="'stage1.langevin.stepsize'"):
        load_config("digits", f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("digits", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_cli_dry_run_prints_resolved_config_and_rejects_bad_values():
    run = [sys.executable, "-m", "hdebm_ray", "pipeline", "--preset", "digits", "--dry-run"]
    out = subprocess.run(run + ["--set", "diffusion.steps=11"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout)["diffusion"]["steps"] == 11
    bad = subprocess.run(run + ["--set", "stage1.langevin.step_size=-1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "stage1.langevin.step_size" in bad.stderr and "Traceback" not in bad.stderr


def test_keys_renamed_in_0_2_are_read_with_one_notice_each(tmp_path, capsys):
    """Stage 2's flat chain keys and the baselines' ``sgld`` section moved to ``<stage>.langevin``: the old spellings
    still load (a config file, ``--set``, an old checkpoint's config.yaml, a tune space's keys), each with a one-line
    notice once per process, and both spellings of one key at once are refused."""
    from hdebm_ray.config import key_type, parse_config, renamed

    renamed._noted.clear()
    text = "stage2:\n  y_step_size: 3.0e-4\n  langevin_steps: 7\nmebm:\n  sgld: {steps: 4}\n"
    old = _write(tmp_path / "old.yaml", text)
    cfg = load_config("digits", old, ["stage2.z2_step_size=2e-3", "icd.sgld.step_size=50"])
    assert (cfg.stage2.langevin.y_step_size, cfg.stage2.langevin.steps, cfg.stage2.langevin.z2_step_size) == (
        3e-4,
        7,
        2e-3,
    )
    assert cfg.mebm.langevin.steps == 4 and cfg.icd.langevin.step_size == 50
    assert cfg.stage2.langevin.z1_step_size == load_config("digits").stage2.langevin.z1_step_size  # untouched
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 5 and all(n.startswith("hdebm-ray: note: config key '") for n in notices)
    assert any("'stage2.y_step_size' is now 'stage2.langevin.y_step_size'" in n and "old.yaml" in n for n in notices)
    assert any("'icd.sgld' is now 'icd.langevin'" in n and "--set" in n for n in notices)
    # once per key and process; an old checkpoint's config (written before 0.2) reads the same way
    written = Config().to_dict()
    chain = written["stage2"].pop("langevin")
    written["stage2"].update({"langevin_steps": chain["steps"], "y_step_size": 1e-3})
    assert parse_config(yaml.safe_dump(written), "config file 'old-ckpt'").stage2.langevin.y_step_size == 1e-3
    assert key_type("mjem.sgld.noise_std") is float
    assert len(capsys.readouterr().err.splitlines()) == 1  # only mjem.sgld is new
    both = _write(tmp_path / "both.yaml", "stage2:\n  y_step_size: 3.0e-4\n  langevin: {y_step_size: 4.0e-4}\n")
    with pytest.raises(ConfigError, match=r"'stage2.y_step_size' and 'stage2.langevin.y_step_size' are both set"):
        load_config("digits", both)
