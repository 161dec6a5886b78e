"""Samples as pictures: square grids of images, and 2-D points (toy2d) as scatter plots over the true modes.

``grid_image`` gives the C×H×W tensor TensorBoard's ``add_image`` takes; ``save_grid`` writes the same as a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import toy2d_centres


def grid_image(x: torch.Tensor, cfg: Config | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B×C×H×W) as one grid in [0, 1] (3×H×W); 2-D points (B×2) as a scatter plot."""
    x = x.detach().cpu().float()
    if x.dim() == 2:
        centres = toy2d_centres(cfg.data.toy2d_mixture) if cfg is not None else None
        pixels = np.asarray(scatter_plot(x, centres), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1)
    from torchvision.utils import make_grid

    grid = make_grid((x.clamp(-1, 1) + 1) / 2, nrow=int(math.ceil(math.sqrt(len(x)))), padding=1)
    return grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid


def data_grid(cfg: Config) -> torch.Tensor:
    """The first ``eval.image_grid`` dataset images: the reference frame next to the sample grids."""
    from .data import build_dataset

    ds = build_dataset(cfg)
    return torch.stack([ds[i][0] for i in range(min(cfg.eval.image_grid, len(ds)))])


def save_grid(x: torch.Tensor, path: str | Path, cfg: Config | None = None) -> Path:
    """``grid_image`` as a PNG file."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid_image(x, cfg), path)
    return path


def scatter_plot(points: torch.Tensor, centres: torch.Tensor | None = None, size: int = 400):
    """A PIL image of points in [-1.2, 1.2]², with the true centres circled in red."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def px(p):
        return (float(p[0]) + 1.2) / 2.4 * size, (1.2 - float(p[1])) / 2.4 * size

    for p in points:
        u, v = px(p)
        draw.point((u, v), fill=(30, 60, 200))
    for c in centres if centres is not None else []:
        u, v = px(c)
        draw.ellipse((u - 3, v - 3, u + 3, v + 3), outline=(220, 30, 30))
    return img
