"""Statistics of a stream of vectors in memory that does not grow with the stream: what the FID reference and
M-EBM's p0 fit accumulate while the dataset streams past once.

- ``RunningMoments``: mean and covariance (or per-dimension variance) in float64, one batch at a time, by the
  pairwise update of Chan, Golub & LeVeque (1979): each batch's own mean and centred scatter are merged into the
  running ones, so no sum of raw squares (which cancels catastrophically) is ever formed.
- ``Reservoir``: a uniform random subset of at most ``capacity`` rows (reservoir sampling, Algorithm R), for the
  KID reference, which needs samples rather than moments.
- ``FrequentDirections``: a ``rows``×D sketch B with BᵀB ≈ XᵀX (Liberty 2013; Ghashami et al. 2016:
  ‖XᵀX − BᵀB‖₂ ≤ ‖X − X_k‖²_F / (rows − k) for every k < rows), for the low-rank part of a covariance whose
  full D×D matrix would not fit.
"""

from __future__ import annotations

import numpy as np
import torch


def as_float64(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return x.detach().reshape(len(x), -1).to("cpu", torch.float64)


class RunningMoments:
    """Count, mean and centred scatter M2 = Σ (x − μ)(x − μ)ᵀ of the rows seen; ``full=False`` keeps only the
    diagonal of M2 (per-dimension variances)."""

    def __init__(self, dim: int, full: bool = True):
        self.count, self.full = 0, full
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros((dim, dim) if full else (dim,), dtype=torch.float64)

    def update(self, x) -> None:
        x = as_float64(x)
        if len(x) == 0:
            return
        n_b, mean_b = len(x), x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred if self.full else centred.pow(2).sum(0)
        self.merge(n_b, mean_b, m2_b)

    def merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Fold in another stream's (count, mean, M2)."""
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        cross = torch.outer(delta, delta) if self.full else delta.pow(2)
        self.m2 = self.m2 + m2_b + cross * (n_a * n_b / n)
        self.count = n

    @property
    def covariance(self) -> torch.Tensor:
        """The sample covariance (divided by N − 1, as ``np.cov``), or the variances when not ``full``."""
        if self.count < 2:
            raise ValueError("a covariance needs at least 2 samples")
        return self.m2 / (self.count - 1)

    @property
    def variance(self) -> torch.Tensor:
        return self.covariance.diagonal() if self.full else self.covariance


class Reservoir:
    """A uniform random subset of at most ``capacity`` of the rows seen (each row kept with equal probability)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity, self.seen, self.rows = capacity, 0, None
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if self.rows is None:
            self.rows = np.empty((0, *x.shape[1:]), dtype=x.dtype)
        room = max(0, self.capacity - len(self.rows))
        if room:
            self.rows = np.concatenate([self.rows, x[:room]])
        rest = x[room:]
        # Row t (1-based, counting every row seen) replaces a uniform slot with probability capacity / t.
        t = self.seen + room + 1 + np.arange(len(rest))
        slots = (self.rng.random(len(rest)) * t).astype(np.int64)
        for row, slot in zip(rest[slots < self.capacity], slots[slots < self.capacity], strict=True):
            self.rows[slot] = row
        self.seen += len(x)

    @property
    def samples(self) -> np.ndarray:
        return self.rows if self.rows is not None else np.empty((0,))


class FrequentDirections:
    """A sketch B (at most ``rows`` rows) of the rows X seen, with BᵀB ≈ XᵀX, in one preallocated 2·rows×D
    buffer whatever N: rows are copied in until it is full, then it shrinks back to ``rows`` rows."""

    def __init__(self, dim: int, rows: int):
        self.rows, self.filled = rows, 0
        self.buffer = torch.zeros(2 * rows, dim, dtype=torch.float64)

    def update(self, x) -> None:
        x = as_float64(x)
        while len(x):
            take = min(len(x), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = x[:take]
            self.filled, x = self.filled + take, x[take:]
            if self.filled == len(self.buffer):
                self.shrink()

    def shrink(self) -> None:
        """Subtract the ``rows``-th squared singular value of the filled buffer B from every squared singular
        value: the ``rows``-1 strongest directions survive in the first ``rows`` rows, the rest are dropped. The
        singular pairs come from the small Gram matrix B·Bᵀ rather than an SVD of the wide B (the same in float64,
        several times faster), and the new rows are written in place, a block of columns at a time, so the
        shrink needs no second copy of the buffer."""
        b = self.buffer[: self.filled]
        lam, u = torch.linalg.eigh(b @ b.T)  # ascending: lam = squared singular values
        lam, u = lam.flip(0)[: self.rows].clamp_min(0), u.flip(1)[:, : self.rows]
        delta = lam[-1] if len(lam) >= self.rows else lam.new_zeros(())
        kept = (lam - delta).clamp_min(0)
        # rows of Vᵀ are uᵀB / s, scaled by sqrt(s² − δ): a zero row wherever nothing is kept
        scale = torch.where(kept > 0, (kept / lam.clamp_min(1e-300)).sqrt(), torch.zeros_like(kept))
        ut = (scale[:, None] * u.T).contiguous()
        for c in range(0, b.shape[1], 4096):  # each block of columns depends only on itself
            block = ut @ b[:, c : c + 4096]
            b[:, c : c + 4096] = 0
            b[: len(block), c : c + 4096] = block
        self.filled = min(self.filled, self.rows)

    @property
    def sketch(self) -> torch.Tensor:
        """The sketch (at most ``rows`` rows; shrinks the buffer first if it holds more)."""
        if self.filled > self.rows:
            self.shrink()
        return self.buffer[: self.filled]
