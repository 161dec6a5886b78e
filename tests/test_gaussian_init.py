"""M-EBM's p0 = N(μ, Σ): the fit has the data's mean and covariance, samples follow it, the low-rank version keeps
each pixel's variance and the leading directions, and the cache round-trips as plain tensors."""

from __future__ import annotations

import torch

from hdebm_ray.config import load_config
from hdebm_ray.core.gaussian_init import cached_gaussian, fit_gaussian
from hdebm_ray.data.datasets import build_dataset


def test_full_fit_has_the_data_mean_and_covariance_and_its_samples_follow_them():
    cfg = load_config("digits")
    ds = build_dataset(cfg)
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # 1797 real 16x16 digits: D = 256
    p0 = fit_gaussian(x, max_full_dim=4096)
    flat = x.flatten(1).double()
    assert torch.allclose(p0.mean, flat.mean(0), atol=1e-12)
    cov = torch.cov(flat.T)
    assert (p0.covariance - cov).abs().max() < 1e-5 * cov.diagonal().mean()  # only the Cholesky jitter differs

    g = torch.Generator().manual_seed(0)
    s = p0.sample(100_000, generator=g).flatten(1).double()
    assert s.shape == (100_000, 256)
    # Monte Carlo: the standard error of a covariance entry is about sqrt(var_i var_j / n) <= max var / 316.
    scale = cov.diagonal().max()
    assert (s.mean(0) - flat.mean(0)).abs().max() < 5 * (scale / 100_000) ** 0.5
    assert (torch.cov(s.T) - cov).abs().max() < 6 * scale / 100_000**0.5


def test_low_rank_fit_keeps_each_variance_and_the_leading_directions():
    g = torch.Generator().manual_seed(1)
    n, dim, true_rank = 4000, 300, 5
    basis = torch.linalg.qr(torch.randn(dim, true_rank, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(n, true_rank, generator=g, dtype=torch.float64) * torch.tensor([5.0, 4, 3, 2, 1])) @ basis.T
    x = x + 0.1 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    p0 = fit_gaussian(x, max_full_dim=100, rank=true_rank)
    assert p0.factor.shape == (dim, true_rank)
    cov = torch.cov(x.T)
    assert torch.allclose(p0.covariance.diagonal(), cov.diagonal(), rtol=1e-6)
    # The approximation's error is the dropped isotropic noise (0.1² off the diagonal at most, in expectation).
    off = p0.covariance - cov
    off.fill_diagonal_(0)
    assert off.abs().max() < 0.05
    # A rank-1 fit of the same data misses the second direction (variance 16): the error is large.
    crude = fit_gaussian(x, max_full_dim=100, rank=1).covariance - cov
    crude.fill_diagonal_(0)
    assert crude.abs().max() > 10 * off.abs().max()


def test_cached_fit_round_trips_as_plain_tensors(tmp_path):
    cfg = load_config("digits")
    ds = build_dataset(cfg)
    first = cached_gaussian(ds, tmp_path, "p0-digits", max_full_dim=4096, rank=64)
    assert (tmp_path / "p0-digits.pt").is_file()
    state = torch.load(tmp_path / "p0-digits.pt", weights_only=True)
    assert set(state) == {"mean", "factor", "diag", "shape"}
    again = cached_gaussian(ds, tmp_path, "p0-digits", max_full_dim=4096, rank=64)
    assert torch.equal(first.factor, again.factor) and again.shape == (1, 16, 16)
