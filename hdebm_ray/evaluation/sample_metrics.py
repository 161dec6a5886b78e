"""Sample-quality metrics beside FID / KID: k-NN precision and recall, and the Inception Score.

- **Precision / recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models"): each set's manifold is the union of balls around its feature vectors, each ball's radius the distance
  to that vector's k-th nearest neighbour in its own set (k = 3 in the paper). Precision is the fraction of
  generated vectors inside the real manifold (are the samples realistic?); recall, the fraction of real vectors
  inside the generated manifold (is the data's variety covered?). A ball contains its boundary, as in the
  paper's code (``distance <= radius``).
- **Inception Score** (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` equal parts of the
  samples, mean and standard deviation over the parts, as in the original and StyleGAN's implementation.

Plain torch on feature matrices, in row blocks so that 50k × 50k distances never sit in memory at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK_ROWS = 1024  # query rows per distance block: 1024 × 50k float32 distances is 200 MB


def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    # float32 distances (matrix-multiply based for large blocks): a radius compares to the nearest 1e-6 relative
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def knn_radii(feats, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest neighbour among the other rows."""
    x = _as_tensor(feats)
    if not 1 <= k < len(x):
        raise ValueError(f"k-NN radii need 1 <= k < the number of vectors ({len(x)}), got k = {k}")
    out = []
    for block in x.split(BLOCK_ROWS):
        d = torch.cdist(block, x)
        # the k+1 smallest include the vector itself (distance 0)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def inside_manifold(queries, centres, radii: torch.Tensor) -> torch.Tensor:
    """Per query row, whether it lies within ``radii[j]`` of some ``centres[j]``."""
    q, c = _as_tensor(queries), _as_tensor(centres)
    return torch.cat([(torch.cdist(block, c) <= radii[None, :]).any(dim=1) for block in q.split(BLOCK_ROWS)])


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` against real features ``real`` (rows are vectors)."""
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean().item()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean().item()
    return precision, recall


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` parts of exp(mean KL(p(y|x) || p(y))); ``probs`` rows are class probabilities."""
    p = _as_tensor(probs, torch.float64)
    splits = max(1, min(splits, len(p)))
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits : (i + 1) * len(p) // splits]
        marginal = part.mean(dim=0, keepdim=True)
        # 0 * log 0 = 0: a class a sample gives no mass adds nothing
        kl = torch.where(part > 0, part * (part.clamp_min(1e-300).log() - marginal.clamp_min(1e-300).log()), 0.0)
        scores.append(math.exp(kl.sum(dim=1).mean().item()))
    return float(np.mean(scores)), float(np.std(scores))
