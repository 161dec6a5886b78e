"""Out-of-distribution detection with a trained energy (Improved CD, Table 3): the energy is the OOD score.

AUROC of telling ``--out`` images (positives) from ``--in`` images by H(x) (low energy = in distribution); 0.5 is
chance, 1.0 perfect. Works for every EBM checkpoint of the project (HDEBM Stage 1/2, M-EBM, ...). A source is a
dataset name at the checkpoint's resolution and channels (``digits``, ``cifar10``, ``image_folder:PATH``,
``parquet:PATH``) or synthetic images: ``uniform`` (U[-1, 1] pixels), ``gaussian`` (N(0, 1) clipped),
``constant`` (one random grey level per image).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.datasets import build_dataset, random_images
from ..networks import sample_shape
from ..progress import progress as show_progress
from .sampling import Sampler

SYNTHETIC = ("uniform", "gaussian", "constant")
DATASETS = ("digits", "cifar10", "image_folder", "parquet")


def source_images(spec: str, cfg: Config, n: int, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` images in [-1, 1] from a source spec, shaped like the checkpoint's data."""

    shape = sample_shape(cfg)
    g = torch.Generator().manual_seed(seed)
    if spec in SYNTHETIC:
        if spec == "uniform":
            return torch.rand(n, *shape, generator=g) * 2 - 1
        if spec == "gaussian":
            return torch.randn(n, *shape, generator=g).clamp(-1, 1)
        return (torch.rand(n, *([1] * len(shape)), generator=g) * 2 - 1).expand(n, *shape).clone()
    name, _, path = spec.partition(":")
    if name not in DATASETS:
        raise ConfigError(f"OOD source {spec!r}: use one of {', '.join(SYNTHETIC + DATASETS)} (image_folder:PATH)")
    data_cfg = cfg.replace(**{"data.dataset": name, **({"data.path": path} if path else {})})
    return random_images(build_dataset(data_cfg), n, seed)


@torch.no_grad()
def energies(energy: torch.nn.Module, images: torch.Tensor, batch: int, device, progress: str | None = None):
    """H(x) of ``images`` in batches (numpy); ``progress``: a label to show progress over the batches under."""
    starts = show_progress(range(0, len(images), batch), desc=progress or "", unit="batches", enabled=bool(progress))
    out = [energy(images[i : i + batch].to(device)).float().cpu() for i in starts]
    return torch.cat(out).numpy()


def auroc(e_in: np.ndarray, e_out: np.ndarray) -> float:
    """Area under the ROC curve of the energy as a score for 'out of distribution' (out = positive)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(e_in)), np.ones(len(e_out))], np.r_[e_in, e_out]))


def ood_auroc(
    ckpt_dir, in_spec: str | None, out_spec: str, n: int = 2000, batch: int = 256, device="cpu", progress=False
) -> dict:
    """AUROC of the checkpoint's energy separating ``out_spec`` from ``in_spec`` (default: its own dataset);
    ``progress``: show progress over the energy batches."""
    sampler = Sampler(ckpt_dir, device=device, protocol="fresh")  # only its energy is used
    if sampler.energy is None:
        raise ConfigError(f"checkpoint {ckpt_dir} is of stage {sampler.stage!r}, which has no energy")
    in_spec = in_spec or sampler.cfg.data.dataset

    def energies_of(spec: str, seed: int) -> np.ndarray:
        images = source_images(spec, sampler.cfg, n, seed=seed)
        return energies(sampler.energy, images, batch, sampler.device, f"ood: energies of {spec}" if progress else None)

    e_in, e_out = energies_of(in_spec, 1), energies_of(out_spec, 2)
    return {
        "checkpoint": str(ckpt_dir),
        "stage": sampler.stage,
        "in": in_spec,
        "out": out_spec,
        "num_in": len(e_in),
        "num_out": len(e_out),
        "auroc": auroc(e_in, e_out),
        "energy_in_mean": float(e_in.mean()),
        "energy_out_mean": float(e_out.mean()),
    }
