"""M-EBM's informative initialisation p0 = N(μ, Σ): one Gaussian fitted to the whole training set
(docs/algorithms.md §8).

Σ is kept as a factor: Σ = F·Fᵀ + diag(d). Up to ``max_full_dim`` dimensions F is the Cholesky factor of the full
sample covariance (d = 0 apart from a tiny jitter). Above it the full matrix would not fit (128×128×3 images:
49152² floats ≈ 10 GB), so F holds the top ``rank`` principal directions and d the variance they leave unexplained
per pixel: the approximation keeps every pixel's variance exactly and the strongest correlations, and drops the
weak long tail of the spectrum. Sampling is μ + F·u + √d ⊙ v, u, v ~ N(0, I).

The dataset is read once, in batches (``fit_gaussian_stream``), in memory that does not grow with its size: the
mean and covariance (or per-pixel variance) accumulate in float64 (``moments.RunningMoments``), and above
``max_full_dim`` the principal directions come from a Frequent Directions sketch of 2·rank rows
(``moments.FrequentDirections``, a 4·rank × D float64 buffer) corrected for the mean. ``fit_gaussian`` is the
same fit of a tensor in memory (randomised SVD of the centred data), kept as the reference the streamed fit is
tested against. The fit is cached as plain tensors next to the dataset, like the FID reference statistics, and
shows its progress on rank 0.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.datasets import iter_batches
from ..progress import duration, mode, write
from .moments import FrequentDirections, RunningMoments


@dataclass
class GaussianInit:
    mean: torch.Tensor  # (D,)
    factor: torch.Tensor  # (D, r)
    diag: torch.Tensor  # (D,) variance not explained by the factor
    shape: tuple[int, ...]  # one sample's shape

    @property
    def covariance(self) -> torch.Tensor:
        """The (D×D) covariance this p0 samples from (only for small D: tests and diagnostics)."""
        return self.factor @ self.factor.T + torch.diag(self.diag)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = device or self.mean.device
        f, d, m = self.factor.to(device), self.diag.to(device), self.mean.to(device)
        u = torch.randn(n, f.shape[1], generator=generator, device=device, dtype=f.dtype)
        v = torch.randn(n, m.shape[0], generator=generator, device=device, dtype=f.dtype)
        x = m + u @ f.T + d.sqrt() * v
        return x.float().reshape(n, *self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "mean": self.mean,
            "factor": self.factor,
            "diag": self.diag,
            "shape": torch.tensor(self.shape, dtype=torch.long),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GaussianInit:
        return cls(state["mean"], state["factor"], state["diag"], tuple(int(s) for s in state["shape"]))


def fit_gaussian(
    x: torch.Tensor, max_full_dim: int = 4096, rank: int = 512, seed: int = 0, cov_jitter: float = 0.0
) -> GaussianInit:
    """Fit N(μ, Σ + cov_jitter·I) to samples ``x`` (N×...); full covariance up to ``max_full_dim`` dimensions, else
    low rank (the jitter then goes to the diagonal). M-EBM's code adds 1e-4·I."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("fitting p0 needs at least 2 samples")
    flat = x.reshape(n, -1).double()
    mean = flat.mean(0)
    centred = flat - mean
    dim = flat.shape[1]
    variance = centred.pow(2).sum(0) / (n - 1)
    if dim <= max_full_dim:
        cov = centred.T @ centred / (n - 1)
        # A jitter relative to the average variance keeps Cholesky defined when N < D or pixels are constant.
        jitter = cov_jitter + 1e-6 * float(variance.mean().clamp_min(1e-12))
        factor = torch.linalg.cholesky(cov + jitter * torch.eye(dim, dtype=cov.dtype))
        diag = torch.zeros(dim, dtype=cov.dtype)
    else:
        q = min(rank, n - 1, dim)
        torch.manual_seed(seed)  # svd_lowrank's random projection
        _, s, v = torch.svd_lowrank(centred, q=q, niter=4)
        factor = v * (s / (n - 1) ** 0.5)
        diag = (variance - factor.pow(2).sum(1)).clamp_min(1e-12) + cov_jitter
    return GaussianInit(mean, factor, diag, tuple(x.shape[1:]))


def fit_gaussian_stream(
    batches, max_full_dim: int = 4096, rank: int = 512, cov_jitter: float = 0.0
) -> tuple[GaussianInit, int]:
    """``fit_gaussian`` of the rows of an iterable of batches (N_b×...), read once; returns the fit and N."""
    moments = sketch = shape = None
    for x in batches:
        if moments is None:
            shape, dim = tuple(x.shape[1:]), x[0].numel()
            moments = RunningMoments(dim, full=dim <= max_full_dim)
            sketch = None if moments.full else FrequentDirections(dim, max(2 * rank, rank + 1))
        moments.update(x)
        if sketch is not None:
            sketch.update(x)  # uncentred: XᵀX, from which n·μμᵀ is taken below
    if moments is None or moments.count < 2:
        raise ValueError("fitting p0 needs at least 2 samples")
    n, mean, variance = moments.count, moments.mean, moments.variance
    dim = mean.numel()
    if moments.full:
        jitter = cov_jitter + 1e-6 * float(variance.mean().clamp_min(1e-12))
        factor = torch.linalg.cholesky(moments.covariance + jitter * torch.eye(dim, dtype=torch.float64))
        return GaussianInit(mean, factor, torch.zeros(dim, dtype=torch.float64), shape), n
    # Σ = (XᵀX − n·μμᵀ)/(n − 1) restricted to the span Q of the sketch and μ, where XᵀX ≈ BᵀB lives.
    b = sketch.sketch
    q, _ = torch.linalg.qr(torch.cat([b, mean[None]]).T)
    bq, mq = b @ q, mean @ q
    small = (bq.T @ bq - n * torch.outer(mq, mq)) / (n - 1)
    eigval, eigvec = torch.linalg.eigh((small + small.T) / 2)
    top = eigval.argsort(descending=True)[: min(rank, n - 1, dim)]
    factor = (q @ eigvec[:, top]) * eigval[top].clamp_min(0).sqrt()
    diag = (variance - factor.pow(2).sum(1)).clamp_min(1e-12) + cov_jitter
    return GaussianInit(mean, factor, diag, shape), n


def first_rank() -> bool:
    """Rank 0 of the process group, or a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cached_gaussian(
    dataset,
    cache_dir: str | Path,
    name: str,
    max_full_dim: int,
    rank: int,
    cov_jitter: float = 0.0,
    progress: bool | None = None,
) -> GaussianInit:
    """p0 of a whole dataset of (image, label) items, fitted in one streamed pass and cached as
    ``<cache_dir>/<name>.pt``. ``progress``: show the fit's progress (None: on rank 0 only)."""

    path = Path(cache_dir) / f"{name}.pt"
    if path.is_file():
        return GaussianInit.from_state_dict(torch.load(path, weights_only=True))
    show = first_rank() if progress is None else progress
    start = time.monotonic()
    label = "p0 fit: reading the dataset" if mode(show) != "off" else None
    p0, n = fit_gaussian_stream(
        (x for x, _ in iter_batches(dataset, 256, progress=label)), max_full_dim, rank, cov_jitter=cov_jitter
    )
    if mode(show) != "off":
        dim = p0.mean.numel()
        kind = "full" if dim <= max_full_dim else f"rank-{p0.factor.shape[1]} + diagonal"
        write(
            f"[p0 fit] N(mu, Sigma) with {kind} covariance fitted to {n} images of {dim} dimensions in "
            f"{duration(time.monotonic() - start)}",
            file=sys.stderr,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks fitting at once never share a temporary
    torch.save(p0.state_dict(), tmp)
    tmp.replace(path)
    return p0
