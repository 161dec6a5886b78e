"""FID and KID of a checkpoint's samples against the dataset (docs/algorithms.md §9), on clean-fid's pipeline.

Images travel exactly as ``cleanfid.fid.compute_fid`` sends two folders: PNG files (samples are quantised to
uint8, as any saved image is), clean-fid's loader and resizer for the extractor, the extractor, then clean-fid's
``frechet_distance`` / ``kernel_distance`` (KID: 100 subsets of at most 1000). The dataset's reference features
are computed once per dataset + extractor + resolution and cached as .npz next to the dataset (``data.path``,
else ``~/.cache/hdebm_ray/<dataset>``), never inside the installed clean-fid package.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .eval_features import EvalError, build_extractor


def cache_dir(cfg: Config) -> Path:
    base = Path(cfg.data.path) if cfg.data.path else Path.home() / ".cache" / "hdebm_ray" / cfg.data.dataset
    return base / "fid_cache"


def write_png_folder(images: torch.Tensor, folder: str | Path) -> Path:
    """Images in [-1, 1] (B×C×H×W) as uint8 PNGs, as they would be saved; grey stays grey (read back as RGB)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(arr):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return folder


def folder_features(folder: str | Path, fn, resize, batch_size: int, device: torch.device) -> np.ndarray:
    from cleanfid.fid import get_folder_features

    return get_folder_features(
        str(folder),
        fn,
        num_workers=0,
        batch_size=batch_size,
        device=device,
        mode="clean",
        custom_fn_resize=resize,
        verbose=False,
    )


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    from cleanfid.fid import fid_from_feats

    return float(fid_from_feats(feats1, feats2))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100) -> float:
    from cleanfid.fid import kernel_distance as kid

    return float(kid(feats1, feats2, num_subsets=num_subsets, max_subset_size=1000))


class FeatureSpace:
    """One extractor, built once (an eval actor keeps it across checkpoints)."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.fn, self.resize = build_extractor(cfg, self.device, cache_dir(cfg))

    def of_samples(self, samples: torch.Tensor) -> np.ndarray:
        if self.fn is None:  # raw vectors (toy2d points, or flattened pixels)
            return samples.detach().cpu().flatten(1).double().numpy()
        with tempfile.TemporaryDirectory(prefix="hdebm-fid-") as tmp:
            write_png_folder(samples, tmp)
            return self.of_folder(tmp)

    def of_folder(self, folder: str | Path) -> np.ndarray:
        return folder_features(folder, self.fn, self.resize, self.cfg.eval.batch_size, self.device)

    def reference(self) -> np.ndarray:
        """The dataset's features, cached as .npz (computed on first use)."""
        from .data import build_dataset, random_images

        d = self.cfg.data
        name = (
            f"ref-{d.dataset}-{self.cfg.eval.features}-{d.resolution}px-{d.channels}ch-n{self.cfg.eval.ref_samples}.npz"
        )
        path = cache_dir(self.cfg) / name
        if path.is_file():
            return np.load(path)["features"]
        ds = build_dataset(self.cfg)
        n = len(ds) if self.cfg.eval.ref_samples <= 0 else min(len(ds), self.cfg.eval.ref_samples)
        feats = self.of_samples(random_images(ds, n, seed=0))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, features=feats, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
        tmp.replace(path)
        return feats


class FeatureSpaces:
    """One ``FeatureSpace`` per dataset + eval settings, built on first use and kept across checkpoints."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.spaces = device, {}

    def __call__(self, cfg: Config) -> FeatureSpace:
        key = (cfg.data, cfg.eval)
        if key not in self.spaces:
            self.spaces[key] = FeatureSpace(cfg, self.device)
        return self.spaces[key]


def sample_checkpoint(ckpt_dir, n: int, batch: int, device, seed: int = 0, **sampler_options):
    """n samples from a checkpoint's own sampler (Langevin included), in batches (at most as many as it has
    distinct samples: a replay buffer's size); the chain starts for the same draws (None for the diffusion stages);
    the checkpoint's metadata; and the sampler (``weights``, ``protocol``). ``sampler_options`` go to ``Sampler``."""
    from .checkpoint import load_meta
    from .sampling import Sampler

    sampler = Sampler(ckpt_dir, device=device, **sampler_options)
    if sampler.max_samples is not None:
        n = min(n, sampler.max_samples)
    final, starts = [], []
    for i in range(0, n, batch):
        x, start = sampler.sample_with_start(min(batch, n - i), seed=seed + i)
        final.append(x.cpu())
        if start is not None:
            starts.append(start.cpu())
    return torch.cat(final), (torch.cat(starts) if starts else None), load_meta(ckpt_dir), sampler


def evaluate_checkpoint(
    ckpt_dir: str | Path, space: FeatureSpace, num_samples: int, seed: int = 0, **sampler_options
) -> dict:
    """FID and KID of ``num_samples`` samples of the checkpoint against the dataset's reference features; for
    the EBM stages also of the chain starts alone, before Langevin: ``fid_generator`` (HDEBM: G(z), same latents)
    or ``fid_init`` (baselines: the p0 / noise draws the chains start from). The result names the weights
    (``raw`` / ``ema``) and, for the baselines, the protocol (``buffer`` / ``fresh``) that were scored."""
    samples, base, meta, sampler = sample_checkpoint(
        ckpt_dir, num_samples, space.cfg.eval.batch_size, space.device, seed, **sampler_options
    )
    ref = space.reference()
    feats = space.of_samples(samples)
    if len(feats) < 2 or len(ref) < 2:
        raise EvalError("FID needs at least 2 samples and 2 reference images")
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
        "fid": frechet_distance(feats, ref),
        "kid": kernel_distance(feats, ref, space.cfg.eval.kid_subsets),
    }
    if base is not None:
        base_feats = space.of_samples(base)
        start = start_name(meta["stage"])
        result[f"fid_{start}"] = frechet_distance(base_feats, ref)
        result[f"kid_{start}"] = kernel_distance(base_feats, ref, space.cfg.eval.kid_subsets)
    return result


def start_name(stage: str) -> str:
    """What an EBM stage's chains start from, as named in results: HDEBM's generator or a baseline's init."""
    return "generator" if stage in ("stage1", "stage2") else "init"


def start_note(result: dict) -> str:
    """', generator alone FID x' (or 'chain init alone') for a result that has one, else ''."""
    for start, label in (("generator", "generator alone"), ("init", "chain init alone")):
        if f"fid_{start}" in result:
            return f", {label} FID {result[f'fid_{start}']:.4g}"
    return ""


def append_jsonl(path: str | Path, record: dict) -> None:
    from . import storage

    text = storage.read_text(str(path)) if storage.exists(str(path)) else ""
    storage.write_text(str(path), text + json.dumps(record, sort_keys=True) + "\n")


def record(run_location: str, result: dict) -> None:
    """Append to ``<run>/eval.jsonl`` and log ``Eval/fid`` / ``Eval/kid`` at the checkpoint's images seen."""
    from torch.utils.tensorboard import SummaryWriter

    from .storage import staged_output

    append_jsonl(f"{run_location}/eval.jsonl", result)
    # events go to a local directory (uploaded afterwards when the run lives under a URI)
    with staged_output(f"{run_location}/tb/{result['stage']}") as local:
        with SummaryWriter(log_dir=str(local), filename_suffix=".eval") as writer:
            suffix = "" if result.get("default_sampler", True) else f"_{result['protocol']}_{result['weights']}"
            for key in ("fid", "kid", "fid_generator", "kid_generator", "fid_init", "kid_init"):
                if key in result:
                    writer.add_scalar(f"Eval/{key}{suffix}", result[key], result["nimg"])


def read_results(run_location: str) -> list[dict]:
    """Every result in ``<run>/eval.jsonl`` (empty if none)."""
    from . import storage

    path = f"{run_location}/eval.jsonl"
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def evaluated(run_location: str, protocol: str | None = None, weights: str | None = None) -> set[str]:
    """Checkpoint paths that already have a result in ``<run>/eval.jsonl`` (with that protocol / those weights,
    when given)."""
    return {
        r["checkpoint"]
        for r in read_results(run_location)
        if protocol in (None, r.get("protocol")) and weights in (None, r.get("weights"))
    }


def run_checkpoints(run_location: str, stages=None) -> list[str]:
    """Every checkpoint of the given stages (default: all) under a run (local path or URI), oldest first per
    stage; paths as the eval pool records them, so the pool and ``hdebm-ray eval`` agree on what is scored."""
    import pyarrow.fs as pafs

    from .storage import as_uri, fs_and_path

    if stages is None:
        fs, base = fs_and_path(run_location)
        stages = sorted(
            i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.Directory
        )
    found = []
    for stage in stages:
        fs, base = fs_and_path(f"{run_location}/{stage}")
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            continue
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.Directory]
        ckpts = sorted(d for d in dirs if d.rsplit("/", 1)[-1].startswith("checkpoint_"))
        found += [as_uri(d, run_location) for d in ckpts if fs.get_file_info(f"{d}/meta.json").is_file]
    return found
