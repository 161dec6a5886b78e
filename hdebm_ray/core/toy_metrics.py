"""Mode coverage and sample quality on 2-D toy mixtures (docs/algorithms.md §10).

A mode is covered when at least ``min_count`` samples lie within ``k·σ`` of its centre; "high quality" samples
lie within ``k·σ`` of any centre.
"""

from __future__ import annotations

import torch


def mode_coverage(
    samples: torch.Tensor, centres: torch.Tensor, std: float, k: float = 3.0, min_count: int = 1
) -> dict[str, float]:
    dist = torch.cdist(samples.float(), centres.float())  # (n, modes)
    nearest_dist, nearest = dist.min(dim=1)
    close = nearest_dist <= k * std
    counts = torch.bincount(nearest[close], minlength=len(centres))
    return {
        "modes_covered": int((counts >= min_count).sum()),
        "modes_total": len(centres),
        "high_quality_fraction": float(close.float().mean()),
    }
