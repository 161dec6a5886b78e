"""Samples as pictures: square grids of images, and 2-D points (toy2d) as scatter plots over the true modes.

``grid_image`` gives the C×H×W tensor TensorBoard's ``add_image`` takes, at native resolution (TensorBoard zooms
itself). ``save_grid`` writes the same grid as a PNG a person can look at: upscaled by an integer factor with
nearest-neighbour (every pixel an exact square block) to at least ``MIN_WIDTH`` px, with an optional caption on a
white strip above it saying what it shows (``sampling.Sampler.caption``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import Config
from ..data.datasets import build_dataset, toy2d_centres

MIN_WIDTH = 512  # px: the narrowest saved grid (a 16-px run's 8×8 grid is 137 px natively)


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
    ds = build_dataset(cfg)
    return torch.stack([ds[i][0] for i in range(min(cfg.eval.image_grid, len(ds)))])


def to_uint8(grid: torch.Tensor) -> np.ndarray:
    """A C×H×W image in [0, 1] as H×W×3 uint8, rounded as ``torchvision.utils.save_image`` does."""
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    return grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def upscale(pixels: np.ndarray, min_width: int = MIN_WIDTH) -> np.ndarray:
    """Nearest-neighbour upscale (H×W×C) by the integer factor ``max(1, ceil(min_width / W))``."""
    factor = max(1, math.ceil(min_width / pixels.shape[1]))
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


def caption_font(size: int):
    """PIL's default font at ``size`` px (Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` px wide (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def with_caption(img, caption: str):
    """``img`` (PIL) below a white strip with ``caption`` in black, wrapped to the image's width."""
    size = max(14, min(24, img.width // 32))
    font, margin = caption_font(size), size // 2
    lines = wrap(caption, font, img.width - 2 * margin)
    line_h = int(size * 1.3)
    strip = 2 * margin + line_h * len(lines)
    out = Image.new("RGB", (img.width, img.height + strip), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_h), line, fill="black", font=font)
    out.paste(img, (0, strip))
    return out


def save_grid(
    x: torch.Tensor, path: str | Path, cfg: Config | None = None, caption: str | None = None, min_width: int = MIN_WIDTH
) -> Path:
    """``grid_image`` as a PNG file at least ``min_width`` px wide (nearest-neighbour, integer factor; 2-D points
    are plotted at that size), under ``caption`` when one is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().cpu().float()
    if x.dim() == 2:
        centres = toy2d_centres(cfg.data.toy2d_mixture) if cfg is not None else None
        img = scatter_plot(x, centres, size=max(min_width, 400))
    else:
        img = Image.fromarray(upscale(to_uint8(grid_image(x, cfg)), min_width))
    if caption:
        img = with_caption(img, caption)
    img.save(path)
    return path


def scatter_plot(points: torch.Tensor, centres: torch.Tensor | None = None, size: int = 400):
    """A PIL image of points in [-1.2, 1.2]², with the true centres circled in red."""
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
