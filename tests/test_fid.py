"""FID / KID: our pipeline equals clean-fid's compute_fid with the same extractor; sanity of the numbers; the
digits feature classifier; raw toy2d features; the eval command's results (JSONL, TensorBoard, exactly once)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY, small_digits_overrides

from hdebm_ray.cli.main import main as cli_main
from hdebm_ray.config import ConfigError, load_config
from hdebm_ray.data.datasets import build_dataset
from hdebm_ray.evaluation import features as eval_features
from hdebm_ray.evaluation.features import EvalError, train_classifier
from hdebm_ray.evaluation.fid import (
    FeatureSpace,
    frechet_distance,
    frechet_to_reference,
    kernel_distance,
    write_png_folder,
)


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data")  # the classifier and reference features are cached here
    return load_config("digits", overrides=[f"data.path={cache}", "eval.features=classifier"])


@pytest.fixture(scope="module")
def digit_images(digits_cfg):
    ds = build_dataset(digits_cfg)
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digit_images):
    root = tmp_path_factory.mktemp("folders")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digit_images), generator=g)  # random halves: sklearn's order groups writers
    real_a = write_png_folder(digit_images[perm[:800]], root / "real_a")
    real_b = write_png_folder(digit_images[perm[800:1600]], root / "real_b")
    noise = torch.rand(digit_images[:800].shape, generator=g) * 2 - 1
    noisy = write_png_folder(noise, root / "noise")
    return real_a, real_b, noisy


def test_feature_classifier_beats_chance_by_far(digits_cfg):
    _, accuracy = train_classifier(digits_cfg)
    assert accuracy > 0.9  # chance is 0.1


def clean_fid_of_folders(folder1, folder2, extractor, **kwargs) -> float:
    """clean-fid's own ``compute_fid`` on two folders with our extractor, on CPU."""
    from cleanfid import fid as cleanfid

    return cleanfid.compute_fid(
        str(folder1),
        str(folder2),
        mode="clean",
        custom_feat_extractor=extractor,
        device=torch.device("cpu"),
        num_workers=0,
        batch_size=100,
        verbose=False,
        **kwargs,
    )


def test_our_fid_equals_clean_fid_compute_fid_on_the_same_folders(digits_cfg, folders):
    space = FeatureSpace(digits_cfg)
    real_a, _, noisy = folders
    ours = frechet_distance(space.of_folder(real_a), space.of_folder(noisy))
    theirs = clean_fid_of_folders(real_a, noisy, space.fn, custom_fn_resize=space.resize)
    assert abs(ours - theirs) < 1e-3


def test_torchscript_features_match_clean_fid_with_its_299_resize(tmp_path, digits_cfg, folders):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    path = tmp_path / "feat.pt"
    torch.jit.script(net).save(str(path))
    cfg = digits_cfg.replace(**{"eval.features": "torchscript", "eval.torchscript_path": str(path)})
    space = FeatureSpace(cfg)
    real_a, real_b, _ = folders
    ours = frechet_distance(space.of_folder(real_a), space.of_folder(real_b))
    theirs = clean_fid_of_folders(real_a, real_b, lambda x: net(x).detach())  # clean-fid's own 299 resize
    assert abs(ours - theirs) < 1e-3
    with pytest.raises(EvalError, match="torchscript_path"):
        FeatureSpace(cfg.replace(**{"eval.torchscript_path": str(tmp_path / "missing.pt")}))


def test_fid_is_zero_on_identical_sets_small_on_real_data_and_large_on_noise(digits_cfg, folders):
    space = FeatureSpace(digits_cfg)
    real_a, real_b, noisy = (space.of_folder(f) for f in folders)
    same = frechet_distance(real_a, real_a)
    held_out = frechet_distance(real_a, real_b)
    noise = frechet_distance(real_a, noisy)
    assert abs(same) < 1e-3
    assert noise > 10 * held_out > 0
    assert kernel_distance(real_a, noisy, 10) > 10 * abs(kernel_distance(real_a, real_b, 10))


def test_raw_toy2d_features_separate_a_shifted_mixture(tmp_path):
    cfg = load_config("toy2d", overrides=[f"data.path={tmp_path}"])
    space = FeatureSpace(cfg)
    ref = space.reference()
    ds = build_dataset(cfg.replace(**{"run.seed": 1}))
    fresh = torch.stack([ds[i][0] for i in range(2000)])
    assert ref.n == 20000  # toy2d_num_samples, streamed
    assert frechet_to_reference(space.of_samples(fresh), ref) < 0.01
    assert frechet_to_reference(space.of_samples(fresh + 0.2), ref) > 0.05
    with pytest.raises(EvalError, match="toy2d"):
        FeatureSpace(cfg.replace(**{"eval.features": "classifier"}))


def test_missing_inception_weights_offline_give_a_clear_error(monkeypatch, tmp_path, digits_cfg):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(eval_features, "INCEPTION_PATH", tmp_path / "inception-2015-12-05.pt")
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # clean-fid's own download, offline
    with pytest.raises(EvalError) as err:
        FeatureSpace(digits_cfg.replace(**{"eval.features": "inception"}))
    assert "inception-2015-12-05.pt" in str(err.value) and "eval.features" in str(err.value)
    assert not (tmp_path / "inception-2015-12-05.pt").exists()  # no partial file left behind
    with pytest.raises(EvalError, match="eval.inception_path = '/nope/w.pt': no such file"):
        FeatureSpace(digits_cfg.replace(**{"eval.features": "inception", "eval.inception_path": "/nope/w.pt"}))


class InceptionStandIn(torch.nn.Module):
    """The TorchScript contract of clean-fid's InceptionV3 file (``inception-2015-12-05.pt``): ``layers`` maps
    normalised 299×299 input to the 2048 pool3 features; ``forward(img in [0, 255])`` gives the 1008-class softmax
    (features with ``return_features``; the logits without the output bias with ``no_output_bias``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        features = self.layers((img - 128) / 128)
        if return_features:
            return features
        logits = features @ self.output.weight.t() if no_output_bias else self.output(features)
        return torch.softmax(logits, dim=1)


def test_inception_features_come_with_class_probabilities_for_the_inception_score(tmp_path, digits_cfg, digit_images):
    from hdebm_ray.evaluation.sample_metrics import inception_score

    weights = tmp_path / "w.pt"
    net = InceptionStandIn()
    torch.jit.script(net).save(str(weights))
    cfg = digits_cfg.replace(**{"eval.features": "inception", "eval.inception_path": str(weights)})
    space = FeatureSpace(cfg)
    assert space.scores_inception
    folder = write_png_folder(digit_images[:100], tmp_path / "images")
    feats, probs = space.of_folder(folder, with_probs=True)
    assert feats.shape == (100, 2048) and probs.shape == (100, 1008)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(feats, space.of_folder(folder))  # the same features as without the probabilities
    # the probabilities are the net's softmax without its output bias, of the same 299×299 clean-resized input
    logits = torch.from_numpy(feats).float() @ net.output.weight.t()
    assert np.allclose(probs, torch.softmax(logits, 1).detach().numpy(), atol=1e-5)
    assert inception_score(probs)[0] >= 1.0
    assert not FeatureSpace(cfg.replace(**{"eval.inception_score": False})).scores_inception
    assert not FeatureSpace(digits_cfg).scores_inception  # the classifier's features: no IS


def test_inception_weights_are_verified_by_checksum_before_use(tmp_path, digits_cfg, capsys):
    """A TorchScript file with clean-fid's contract (``layers``) stands in for the 92 MB weights: its hash is
    pinned at first use, a changed file is refused before it is loaded, and a configured hash is enforced."""
    import hashlib

    weights = tmp_path / "w.pt"
    torch.jit.script(InceptionStandIn()).save(str(weights))
    cfg = digits_cfg.replace(**{"eval.features": "inception", "eval.inception_path": str(weights)})
    fn, _ = eval_features.build_extractor(cfg, torch.device("cpu"), tmp_path)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (tmp_path / "w.pt.sha256").read_text().strip() == digest and digest in capsys.readouterr().out
    assert fn(torch.full((2, 3, 299, 299), 128.0)).shape == (2, 2048)
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(EvalError, match=rf"w\.pt' has SHA-256 [0-9a-f]{{64}}, not {digest} \(the hash pinned"):
        eval_features.build_extractor(cfg, torch.device("cpu"), tmp_path)
    pinned = cfg.replace(**{"eval.inception_sha256": "0" * 64})
    with pytest.raises(EvalError, match=r"not 0{64} \(eval.inception_sha256\)"):
        eval_features.build_extractor(pinned, torch.device("cpu"), tmp_path)
    with pytest.raises(ConfigError, match="eval.inception_sha256"):
        cfg.replace(**{"eval.inception_sha256": "abc"})


def test_eval_command_records_each_checkpoint_once_in_jsonl_and_tensorboard(tmp_path, digits_cfg, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hdebm_ray.training.runner import run_in_process

    overrides = small_digits_overrides(str(tmp_path), "evalrun") + TINY + [f"data.path={digits_cfg.data.path}"]
    cfg = load_config("digits", overrides=overrides + ["eval.features=classifier"])
    ckpt = None
    for stage in ("diffusion", "distill", "stage1"):
        _, ckpt = run_in_process(cfg, stage, tmp_path / "evalrun" / stage, init_dir=ckpt)
    run = tmp_path / "evalrun"
    assert cli_main(["eval", "--run", str(run), "--n", "200"]) == 0
    lines = (run / "eval.jsonl").read_text().splitlines()
    checkpoints = sorted(str(p.parent) for p in run.glob("*/checkpoint_*/meta.json"))
    assert len(lines) == len(checkpoints) >= 3
    assert cli_main(["eval", "--run", str(run), "--n", "200"]) == 0  # nothing new: no second result
    assert len((run / "eval.jsonl").read_text().splitlines()) == len(lines)
    monkeypatch.chdir(tmp_path)  # the same run named by a relative path is the same run
    assert cli_main(["eval", "--run", "evalrun", "--n", "200"]) == 0
    assert len((run / "eval.jsonl").read_text().splitlines()) == len(lines)
    for result in map(json.loads, lines):  # k-NN precision / recall beside FID and KID (classifier features: no IS)
        assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1 and "is" not in result
        if result["stage"] == "stage1":
            assert 0 <= result["precision_generator"] <= 1 and 0 <= result["recall_generator"] <= 1
    acc = EventAccumulator(str(run / "tb" / "stage1"))
    acc.Reload()
    assert {"Eval/precision", "Eval/recall", "Eval/precision_generator", "Eval/recall_generator"} <= set(
        acc.Tags()["scalars"]
    )
    fids = acc.Scalars("Eval/fid")
    assert [e.step for e in fids] == sorted(e.step for e in fids) and all(np.isfinite(e.value) for e in fids)
    assert {e.step for e in fids} == {int(s) * 16 for s in (2, 4)}  # nimg of the Stage 1 checkpoints
