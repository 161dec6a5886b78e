"""Search-space files: the shipped ones load; bad keys, ranges and distributions fail naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hdebm_ray.config import ConfigError, load_config
from hdebm_ray.distributed.search_space import load_space, parse_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load_against_their_presets(path):
    preset = "toy2d" if "toy2d" in path.name else "digits"
    space = load_space(path, load_config(preset))
    assert space.params and space.mode in ("min", "max")
    tune_space = space.param_space()
    assert set(tune_space) == {p.key for p in space.params}


def space(params: str, head: str = "stage: stage1\nmetric: Energy/abs_gap\nmode: min\n") -> str:
    return head + "params:\n" + params


@pytest.mark.parametrize(
    "text, key, message",
    [
        (space("  stage1.langevin.stepsize: {uniform: [0.1, 0.2]}\n"), "stage1.langevin.stepsize", "unknown"),
        (space("  stage1.langevin.step_size: {loguniform: [0.0, 0.1]}\n"), "step_size", "lower > 0"),
        (space("  stage1.langevin.step_size: {uniform: [0.2, 0.1]}\n"), "step_size", "below upper"),
        (space("  stage1.langevin.step_size: {uniform: [-0.1, 0.1]}\n"), "step_size", "not a valid config value"),
        (space("  stage1.langevin.steps: {randint: [0, 10]}\n"), "stage1.langevin.steps", "not a valid config value"),
        (space("  stage1.langevin.steps: {randint: [1.5, 10]}\n"), "stage1.langevin.steps", "integers"),
        (space("  stage1.langevin.steps: {choice: []}\n"), "stage1.langevin.steps", "non-empty"),
        (space("  stage1.langevin.steps: {normal: [1, 2]}\n"), "stage1.langevin.steps", "unknown distribution"),
        (space("  stage1.lr_energy: {choice: [1e-4, fast]}\n"), "stage1.lr_energy", "not a valid config value"),
        (space("  stage1.steps: 10\n"), "stage1.steps", "expected one of"),
        ("stage: stage9\nmetric: m\nparams: {stage1.steps: {choice: [1]}}\n", "stage", "unknown stage"),
        ("stage: stage1\nmetric: m\nmode: best\nparams: {stage1.steps: {choice: [1]}}\n", "mode", "'min' or 'max'"),
        ("stage: stage1\nparams: {stage1.steps: {choice: [1]}}\n", "metric", "missing"),
        ("stage: stage1\nmetric: m\nsamples: 3\nparams: {stage1.steps: {choice: [1]}}\n", "samples", "unknown key"),
        ("stage: stage1\nmetric: Eval/FID\nparams: {stage1.steps: {choice: [8]}}\n", "metric", "mean Eval/fid?"),
        ("stage: diffusion\nmetric: Loss/energy\nparams: {diffusion.lr: {choice: [1e-4]}}\n", "metric", "not report"),
    ],
)
def test_bad_spaces_are_rejected_naming_the_key(text, key, message):
    with pytest.raises(ConfigError) as err:
        parse_space(text, "bad.yaml", load_config("digits"))
    assert key in str(err.value) and message in str(err.value) and "bad.yaml" in str(err.value)


def test_a_metric_given_on_the_command_line_replaces_the_files_before_the_check():
    text = "stage: stage1\nmetric: Eval/FID\nparams: {stage1.steps: {choice: [8]}}\n"
    assert parse_space(text, "s.yaml", load_config("digits"), metric="Eval/fid").metric == "Eval/fid"
    with pytest.raises(ConfigError, match="--metric: stage stage1 does not report 'Loss/diffusion'"):
        parse_space(text, "s.yaml", load_config("digits"), metric="Loss/diffusion")


@pytest.mark.parametrize("override", ["eval.actors=0", "eval.stages=[stage2]"])
def test_an_eval_pool_metric_without_eval_actors_scoring_the_stage_is_refused(override):
    text = "stage: stage1\nmetric: Eval/fid\nmode: min\nparams: {stage1.steps: {choice: [8]}}\n"
    assert parse_space(text, "s.yaml", load_config("digits")).metric == "Eval/fid"  # the preset has an eval actor
    with pytest.raises(ConfigError, match="metric: Eval/fid comes from eval actors scoring stage stage1.*actors=1"):
        parse_space(text, "s.yaml", load_config("digits", overrides=[override]))


def test_distributions_map_to_ray_tune_domains():
    from ray import tune

    text = space(
        "  stage1.langevin.step_size: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  stage1.lr_energy: {uniform: [1.0e-4, 2.0e-4]}\n"
        "  stage1.langevin.steps: {randint: [5, 8]}\n"
        "  stage1.beta2: {choice: [0.0, 0.1]}\n"
        "  stage1.lr_generator: {grid: [1.0e-4, 2.0e-4]}\n"
    )
    ps = parse_space(text, "s.yaml", load_config("digits")).param_space()
    assert isinstance(ps["stage1.langevin.step_size"], tune.search.sample.Float)
    assert ps["stage1.langevin.step_size"].lower == 1e-4
    assert isinstance(ps["stage1.langevin.steps"], tune.search.sample.Integer)
    assert ps["stage1.langevin.steps"].upper == 8  # exclusive, as Tune's randint
    assert ps["stage1.lr_generator"] == {"grid_search": [1e-4, 2e-4]}
    samples = {ps["stage1.langevin.steps"].sample() for _ in range(200)}
    assert samples == {5, 6, 7}


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path, capsys):
    import ray

    from hdebm_ray.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(space("  stage1.langevin.stepsize: {uniform: [0.1, 0.2]}\n"))
    assert main(["tune", "--preset", "toy2d", "--space", str(bad), "--set", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "params.stage1.langevin.stepsize" in err and "bad.yaml" in err
    assert not ray.is_initialized() and not (tmp_path / "toy2d").exists()


def test_the_declared_metrics_are_what_each_stage_reports(tmp_path):
    """Every key a stage's report carries is declared (so a space may tune on it), and every declared key of its
    own turns up, but for those that need Ray, filled buffers or a guard event."""
    from hdebm_ray.io.checkpoint import load_meta
    from hdebm_ray.stages import STAGES, reported_metrics
    from hdebm_ray.stages.reported import LOOP
    from hdebm_ray.training.runner import run_in_process

    short = [f"{s}.steps=2" for s in ("diffusion", "stage1", "stage2", "mebm", "mjem", "icd")]
    short += [f"{s}.report_every=2" for s in STAGES] + [f"{s}.checkpoint_every=2" for s in STAGES]
    short += ["distill.n0_steps=2", "distill.steps_per_stage=2", "icd.entropy_min_filled=1000000"]
    cfg = load_config("toy2d", overrides=short)
    conditional = {"Bank/loaded_snapshot_step", "Bank/reconstructed", "Loss/nn_entropy"}
    init = None
    for stage in ("diffusion", "distill", "stage1", "stage2", "mebm", "mjem", "icd"):
        _, ckpt = run_in_process(cfg, stage, tmp_path / stage, init_dir=init if stage in INIT else None)
        init = ckpt if stage in ("diffusion", "distill", "stage1") else init
        reported = set(load_meta(ckpt)["metrics"])  # the report the checkpoint rode on
        assert reported <= reported_metrics(stage, STAGES[stage].data_streams), stage
        assert STAGES[stage].reports - conditional - {"Guard/rollbacks", "Guard/scale"} <= reported, stage
        assert LOOP <= reported


INIT = {"distill", "stage1", "stage2"}


def test_pbt_chunks_end_at_each_interval_and_at_the_last_step():
    from hdebm_ray.distributed.pbt import chunk_ends

    assert chunk_ends(0, 40, 20) == [20, 40]
    assert chunk_ends(20, 40, 20) == [40]  # a clone that starts at the donor's step
    assert chunk_ends(40, 40, 20) == []  # finished
    assert chunk_ends(7, 50, 20) == [20, 40, 50]  # resumed between two perturbations; the last chunk is shorter


def test_pbt_explores_within_the_space_and_moves_listed_values_to_neighbours():
    from hdebm_ray.distributed.pbt import pbt_scheduler

    base = load_config("toy2d")
    s = parse_space(
        space(
            "  stage1.langevin.step_size: {loguniform: [1.0e-3, 2.0e-2]}\n  stage1.langevin.steps: {choice: [10, 20]}\n"
        ),
        "inline",
        base,
    )
    pbt = pbt_scheduler(s, 20, 0.25, 0.0)
    assert pbt._hyperparam_mutations["stage1.langevin.steps"] == [10, 20]
    # the explore step scales by 1.2 / 0.8: the clip keeps the result inside the range the space was checked on
    clipped = pbt._custom_explore_fn({"stage1.langevin.step_size": 0.019 * 1.2, "stage1.langevin.steps": 20})
    assert clipped["stage1.langevin.step_size"] == 2.0e-2 and clipped["stage1.langevin.steps"] == 20
    assert pbt._custom_explore_fn({"stage1.langevin.step_size": 5e-4})["stage1.langevin.step_size"] == 1.0e-3


def test_synchronous_pbt_moves_its_sync_point_past_trials_that_all_reached_it():
    from hdebm_ray.distributed.pbt_scheduler import next_sync_point

    assert next_sync_point(40, [20, 20, 0, 20], 20) == 40  # waiting for a trial: unchanged
    assert next_sync_point(40, [20, 20, 20, 20], 20) == 40  # just perturbed at 20, next at 40
    # a restored sweep: PBT's point restarts at 20 while every trial reports 40; Ray moves it to 40 and no paused
    # trial is below it (the stall); it must go one interval past them
    assert next_sync_point(40, [40, 40, 40, 40], 20) == 60
    assert next_sync_point(20, [], 20) == 20


def test_synchronous_pbt_releases_the_trials_waiting_on_one_that_failed_for_good():
    """Three trials paused at the sync point (step 150) wait for a fourth that then fails: without the release no
    trial is ever chosen to run again (the sweep hung for 27 min). A failure Tune will retry keeps them waiting."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from hdebm_ray.distributed.pbt import pbt_scheduler

    base = load_config("toy2d")
    one_key = parse_space(space("  stage1.lr_energy: {loguniform: [1.0e-4, 1.0e-3]}\n"), "s", base)
    pbt = pbt_scheduler(one_key, 150, 0.25, 0.0)

    class StubTrial:  # what PBT and Tune's error path read of a trial
        def __init__(self, status, recover=False):
            self.status, self.recover = status, recover

        def should_recover(self):
            return self.recover

        def is_finished(self):
            return self.status in (Trial.TERMINATED, Trial.ERROR)

    waiting = [StubTrial(Trial.PAUSED) for _ in range(3)]
    failing = StubTrial(Trial.RUNNING, recover=True)
    for t, clock in [*((t, 150) for t in waiting), (failing, 0)]:
        pbt._trial_state[t] = SimpleNamespace(last_train_time=clock)
    pbt._next_perturbation_sync = 150
    controller = SimpleNamespace(get_trials=lambda: [*waiting, failing])
    assert pbt.choose_trial_to_run(controller) is None  # all three wait for the fourth

    pbt.on_trial_error(controller, failing)  # a retry: it reports again
    assert pbt._next_perturbation_sync == 150 and pbt.choose_trial_to_run(controller) is None
    failing.recover = False
    pbt.on_trial_error(controller, failing)  # for good
    assert pbt._next_perturbation_sync == 300 and pbt.choose_trial_to_run(controller) in waiting


def test_random_search_keeps_to_max_concurrent():
    """Tune ignores ``max_concurrent_trials`` beside a seeded ``BasicVariantGenerator`` (it warns once): the
    generator must hold the limit, or every trial starts at once (4 Train worker groups timed out starting on 2
    cores)."""
    from ray.tune.experiment import Experiment

    from hdebm_ray.distributed.sweep import SweepOptions, _search_alg

    shipped = load_space(SPACES[0].parent / "stage1_toy2d.yaml", load_config("toy2d"))
    alg = _search_alg(shipped, SweepOptions(name="s", max_concurrent=2), 0)
    alg.add_configurations([Experiment("s", run=lambda config: None, config=shipped.param_space(), num_samples=4)])
    first, second = alg.next_trial(), alg.next_trial()
    assert first is not None and second is not None and alg.next_trial() is None
    alg.on_trial_complete(first.trial_id)
    assert alg.next_trial() is not None


def test_random_search_is_seeded_by_run_seed():
    """The same seed samples the same trials (a PBT sweep and a random one compared on equal terms start alike);
    another seed samples others."""
    from ray.tune.experiment import Experiment

    from hdebm_ray.distributed.sweep import SweepOptions, _search_alg

    shipped = load_space(SPACES[0].parent / "stage1_toy2d.yaml", load_config("toy2d"))

    def first_trials(seed: int) -> list[dict]:
        alg = _search_alg(shipped, SweepOptions(name="s", max_concurrent=3), seed)
        alg.add_configurations([Experiment("s", run=lambda config: None, config=shipped.param_space(), num_samples=3)])
        return [alg.next_trial().config for _ in range(3)]

    assert first_trials(0) == first_trials(0)
    assert first_trials(0) != first_trials(1)


def test_an_embedded_ray_for_a_sweep_fits_each_trials_workers_eval_actor_and_driver(monkeypatch):
    import os

    from hdebm_ray.distributed.cluster import local_cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = load_config("digits")  # 2 workers x 1 CPU and 1 eval actor x 1 CPU
    assert local_cpus(cfg) == 3
    # A trial's driver holds 0.1 CPU beside them: with 3 logical CPUs its worker group would wait forever.
    assert local_cpus(cfg, concurrent_runs=1, extra_cpus=0.1) == 4
    assert local_cpus(cfg, concurrent_runs=2, extra_cpus=0.2) == 7
    assert local_cpus(load_config("digits", overrides=["eval.actors=0", "ray.num_workers=1"])) == 2  # the machine's


def test_resume_refuses_a_sweep_folder_other_users_can_write(tmp_path, capsys):
    """--resume unpickles Tune's saved state in the driver: a sweep folder someone else could have written is refused
    in one line (before Ray starts), and the same folder made private passes that check."""
    from hdebm_ray.cli.main import main

    good = tmp_path / "good.yaml"
    good.write_text(space("  stage1.langevin.step_size: {uniform: [0.001, 0.002]}\n"))
    sweep = tmp_path / "s"
    (sweep / "trial-0").mkdir(parents=True)
    state = sweep / "trial-0" / "params.pkl"
    state.write_bytes(b"not really a pickle")
    os.chmod(sweep, 0o755)
    os.chmod(sweep / "trial-0", 0o755)
    args = ["tune", "--preset", "toy2d", "--space", str(good), "--name", "s", "--resume", "--dry-run"]
    args += ["--set", f"run.storage_path={tmp_path}"]
    for mode in (0o666, 0o602):  # (group write alone is fine where the group is this user's own, as here)
        os.chmod(state, mode)
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"'{state}' is writable by other users" in err and "tune --resume" in err, err
    os.chmod(state, 0o644)
    link = sweep / "trial-0" / "linked.pkl"  # a link into a folder others can write is no better
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    (shared / "x.pkl").write_bytes(b"planted")
    os.chmod(shared / "x.pkl", 0o666)
    link.symlink_to(shared / "x.pkl")
    assert main(args) == 2 and f"'{link}' is writable by other users" in capsys.readouterr().err
    link.unlink()
    assert main(args) == 2  # now refused only for the missing --init-from, after the check passed
    err = capsys.readouterr().err
    assert "writable by other users" not in err and "--init-from" in err, err
