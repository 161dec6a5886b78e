"""FID and KID of a checkpoint's samples against the dataset (docs/algorithms.md §9), on clean-fid's pipeline;
beside them k-NN precision / recall and, on Inception features, the Inception Score (``sample_metrics``).

Images travel exactly as ``cleanfid.fid.compute_fid`` sends two folders: PNG files (samples are quantised to
uint8, as any saved image is), clean-fid's loader and resizer for the extractor, the extractor, then clean-fid's
``frechet_distance`` / ``kernel_distance`` (KID: 100 subsets of at most 1000).

The dataset's reference is statistics, not features: the dataset streams through the extractor in batches and
only the mean and covariance (float64, ``moments.RunningMoments``) and a uniform random subset of
``eval.kid_reference_samples`` feature vectors for KID (``moments.Reservoir``) are kept, so memory does not grow
with the dataset (ImageNet's 1.28 M × 2048 features would be 21 GB). They are computed once per dataset + extractor
+ settings and cached as .npz next to the dataset (``data.cache_root``), never inside the installed clean-fid.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from glob import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..core.moments import Reservoir, RunningMoments
from ..data.datasets import build_dataset, cache_root, data_fingerprint, iter_batches
from ..io.checkpoint import load_meta
from ..progress import progress as show_progress
from .features import EvalError, build_extractor
from .sample_metrics import inception_score, precision_recall
from .sampling import Sampler

INCEPTION_DIM = 2048  # pool3 features; the class probabilities follow them in ``features_and_probs``


def cache_dir(cfg: Config) -> Path:
    return cache_root(cfg) / "fid_cache"


def write_png_folder(images: torch.Tensor, folder: str | Path) -> Path:
    """Images in [-1, 1] (B×C×H×W) as uint8 PNGs, as they would be saved; grey stays grey (read back as RGB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(arr):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return folder


def folder_features(
    folder: str | Path, fn, resize, batch_size: int, device: torch.device, progress: str | None = None
) -> np.ndarray:
    """clean-fid's features of a folder of images, as ``get_folder_features`` computes them: its sorted file list
    in batches of ``batch_size``, one ``get_files_features`` call per batch so that progress can be shown under
    the label ``progress`` (None: silent). The batches are clean-fid's own, so the features are too."""
    from cleanfid.fid import EXTENSIONS, get_files_features

    fdir = str(folder)
    files = sorted(f for ext in EXTENSIONS for f in glob(os.path.join(fdir, f"**/*.{ext}"), recursive=True))
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    shown = show_progress(batches, desc=progress or "", unit="batches", enabled=progress is not None, leave=False)
    options = dict(num_workers=0, batch_size=batch_size, device=device, mode="clean", custom_fn_resize=resize)
    return np.concatenate([get_files_features(chunk, fn, fdir=fdir, verbose=False, **options) for chunk in shown])


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    from cleanfid.fid import fid_from_feats

    return float(fid_from_feats(feats1, feats2))


def frechet_to_reference(feats: np.ndarray, ref: ReferenceStats) -> float:
    """FID of features against a reference's (μ, Σ): ``fid_from_feats`` with one side given by its moments."""
    from cleanfid.fid import frechet_distance as frechet

    return float(frechet(np.mean(feats, axis=0), np.cov(feats, rowvar=False), ref.mu, ref.sigma))


class ReferenceStats:
    """What evaluation needs of the dataset's features: their mean ``mu``, covariance ``sigma`` (N − 1), a random
    subset ``kid_features`` for KID, the number of images ``n``, and ``produced_by`` (what computed them)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, kid_features: np.ndarray, n: int, produced_by: dict):
        self.mu, self.sigma, self.kid_features, self.n, self.produced_by = mu, sigma, kid_features, n, produced_by

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # eval actors saving at once
        produced = np.array(json.dumps(self.produced_by))
        np.savez(tmp, mu=self.mu, sigma=self.sigma, kid_features=self.kid_features, n=self.n, produced_by=produced)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as z:
            produced = json.loads(str(z["produced_by"]))
            return cls(z["mu"], z["sigma"], z["kid_features"], int(z["n"]), produced)

    @classmethod
    def of_stream(cls, feature_batches, kid_samples: int, produced_by: dict, seed: int = 0) -> ReferenceStats:
        moments = reservoir = None
        for feats in feature_batches:
            if moments is None:
                moments, reservoir = RunningMoments(feats.shape[1]), Reservoir(kid_samples, seed)
            moments.update(feats)
            reservoir.update(feats)
        if moments is None or moments.count < 2:
            raise EvalError("FID needs at least 2 samples and 2 reference images")
        mu, sigma = moments.mean.numpy(), moments.covariance.numpy()
        return cls(mu, sigma, reservoir.samples, moments.count, {**produced_by, "images": moments.count})


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100) -> float:
    from cleanfid.fid import kernel_distance as kid

    return float(kid(feats1, feats2, num_subsets=num_subsets, max_subset_size=1000))


class FeatureSpace:
    """One extractor, built once (an eval actor keeps it across checkpoints).

    ``progress``: show the feature classifier's training, if it is trained here (off in eval actors). The
    ``progress`` of ``of_samples`` / ``of_folder`` / ``reference`` is a label to show extraction under (None: silent).
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", progress: bool = False):
        self.cfg, self.device = cfg, torch.device(device)
        self.fn, self.resize = build_extractor(cfg, self.device, cache_dir(cfg), progress=progress)

    @property
    def scores_inception(self) -> bool:
        """Whether ``of_samples(..., with_probs=True)`` gives class probabilities (the Inception Score's)."""
        return self.cfg.eval.inception_score and hasattr(self.fn, "features_and_probs")

    def of_samples(self, samples: torch.Tensor, progress: str | None = None, with_probs: bool = False):
        """The samples' features; with ``with_probs`` (and ``scores_inception``), (features, class probabilities)."""
        if self.fn is None:  # raw vectors (toy2d points, or flattened pixels)
            feats = samples.detach().cpu().flatten(1).double().numpy()
            return (feats, None) if with_probs else feats
        with tempfile.TemporaryDirectory(prefix="hdebm-fid-") as tmp:
            write_png_folder(samples, tmp)
            return self.of_folder(tmp, progress, with_probs)

    def of_folder(self, folder: str | Path, progress: str | None = None, with_probs: bool = False):
        both = with_probs and self.scores_inception
        fn = self.fn.features_and_probs if both else self.fn
        out = folder_features(folder, fn, self.resize, self.cfg.eval.batch_size, self.device, progress)
        if not with_probs:
            return out
        return (out[:, :INCEPTION_DIM], out[:, INCEPTION_DIM:]) if both else (out, None)

    def reference(self, progress: str | None = None) -> ReferenceStats:
        """The dataset's reference statistics, cached as .npz (streamed on first use)."""
        d, e = self.cfg.data, self.cfg.eval
        produced_by = {
            "dataset": d.dataset,
            "path": d.path,
            "resolution": d.resolution,
            "channels": d.channels,
            "features": e.features,
            "ref_samples": e.ref_samples,
            "kid_reference_samples": e.kid_reference_samples,
            "files": data_fingerprint(self.cfg),
        }
        key = hashlib.sha1(json.dumps(produced_by, sort_keys=True).encode()).hexdigest()[:10]
        name = f"ref-{d.dataset}-{e.features}-{d.resolution}px-{d.channels}ch-n{e.ref_samples}-{key}.npz"
        path = cache_dir(self.cfg) / name
        if path.is_file():
            return ReferenceStats.load(path)
        ds = build_dataset(self.cfg)
        indices = None  # all, in storage order
        if 0 < e.ref_samples < len(ds):
            indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: e.ref_samples].tolist()
        chunk = 4 * e.batch_size  # images per temporary PNG folder
        batches = iter_batches(ds, chunk, indices, progress)
        stats = ReferenceStats.of_stream((self.of_samples(x) for x, _ in batches), e.kid_reference_samples, produced_by)
        stats.save(path)
        return stats


class FeatureSpaces:
    """One ``FeatureSpace`` per dataset + eval settings, built on first use and kept across checkpoints."""

    def __init__(self, device: torch.device | str = "cpu", progress: bool = False):
        self.device, self.spaces, self.progress = device, {}, progress

    def __call__(self, cfg: Config) -> FeatureSpace:
        key = (cfg.data, cfg.eval)
        if key not in self.spaces:
            self.spaces[key] = FeatureSpace(cfg, self.device, self.progress)
        return self.spaces[key]


def sample_checkpoint(ckpt_dir, n: int, batch: int, device, seed: int = 0, progress: bool = False, **sampler_options):
    """n samples from a checkpoint's own sampler (Langevin included), in batches (at most as many as it has
    distinct samples: a replay buffer's size); the chain starts for the same draws (None for the diffusion stages);
    the checkpoint's metadata; and the sampler (``weights``, ``protocol``). ``sampler_options`` go to ``Sampler``.
    ``progress``: show progress over the batches (the CLI; eval actors stay silent)."""
    sampler = Sampler(ckpt_dir, device=device, **sampler_options)
    if sampler.max_samples is not None:
        n = min(n, sampler.max_samples)
    final, starts = [], []
    batches = range(0, n, batch)
    desc = f"eval: sampling {sampler.stage} step {sampler.step}"
    for i in show_progress(batches, desc=desc, unit="batches", enabled=progress, leave=False):
        x, start = sampler.sample_with_start(min(batch, n - i), seed=seed + i)
        final.append(x.cpu())
        if start is not None:
            starts.append(start.cpu())
    return torch.cat(final), (torch.cat(starts) if starts else None), load_meta(ckpt_dir), sampler


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    space: FeatureSpace,
    num_samples: int,
    seed: int = 0,
    progress: bool = False,
    **sampler_options,
) -> dict:
    """FID and KID of ``num_samples`` samples of the checkpoint against the dataset's reference features; for
    the EBM stages also of the chain starts alone, before Langevin: ``fid_generator`` (HDEBM: G(z), same latents)
    or ``fid_init`` (baselines: the p0 / noise draws the chains start from). The result names the weights
    (``raw`` / ``ema``) and, for the baselines, the protocol (``buffer`` / ``fresh``) that were scored.
    ``progress``: show progress over the sampling and feature batches (the CLI; off in the eval actors)."""
    samples, base, meta, sampler = sample_checkpoint(
        ckpt_dir, num_samples, space.cfg.eval.batch_size, space.device, seed, progress, **sampler_options
    )
    ref = space.reference("eval: reference statistics" if progress else None)
    feats, probs = space.of_samples(samples, "eval: sample features" if progress else None, with_probs=True)
    if len(feats) < 2 or ref.n < 2:
        raise EvalError("FID needs at least 2 samples and 2 reference images")
    k = space.cfg.eval.pr_k
    result = {
        "checkpoint": str(ckpt_dir),
        "stage": meta["stage"],
        "step": meta["step"],
        "nimg": meta["nimg"],
        "features": space.cfg.eval.features,
        "num_samples": len(feats),
        "weights": sampler.weights,
        "protocol": sampler.protocol,
        # False when weights / protocol were chosen by hand: logged under their own TensorBoard tags
        "default_sampler": all(sampler_options.get(k) is None for k in ("use_ema", "protocol")),
        "fid": frechet_to_reference(feats, ref),
        "kid": kernel_distance(feats, ref.kid_features, space.cfg.eval.kid_subsets),
        **manifold_scores(feats, ref, k),
    }
    if probs is not None:
        result["is"], result["is_std"] = inception_score(probs)
    if base is not None:
        base_feats = space.of_samples(base, f"eval: {sampler.start_name} features" if progress else None)
        start = sampler.start_name
        result[f"fid_{start}"] = frechet_to_reference(base_feats, ref)
        result[f"kid_{start}"] = kernel_distance(base_feats, ref.kid_features, space.cfg.eval.kid_subsets)
        result.update({f"{key}_{start}": v for key, v in manifold_scores(base_feats, ref, k).items()})
    return result


def manifold_scores(feats: np.ndarray, ref: ReferenceStats, k: int, seed: int = 0) -> dict[str, float]:
    """k-NN precision and recall (``sample_metrics.precision_recall``) against as many reference vectors as there are
    samples, drawn from the KID subset (both manifolds then have the same density of balls); {} when k = 0 or a
    set is too small for k neighbours."""
    n = min(len(feats), len(ref.kid_features))
    if k <= 0 or n <= k:
        return {}
    rows = np.random.default_rng(seed).permutation(len(ref.kid_features))[:n]
    precision, recall = precision_recall(ref.kid_features[rows], feats[:n], k)
    return {"precision": precision, "recall": recall, "pr_samples": n}  # both sets' size: P / R depend on it
