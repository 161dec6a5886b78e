"""Batched data augmentations with a fresh random draw per sample, on any device (docs/algorithms.md §8).

Improved CD applies them to chain starts and, while sampling, every few Langevin steps (augmentation
transitions: colour, flip, rescale, blur); M-JEM to the classifier's batch (crop, flip). Images are (B, C, H, W)
in [-1, 1]; ``jitter`` is the toy2d counterpart (Gaussian noise on (B, D) vectors). Everything is vectorised: one
``grid_sample`` for crop and rescale, one grouped convolution for blur, so a transition costs about one small
conv layer, not a Python loop over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Fixed parts, after SimCLR / Improved CD's pipelines: blur σ ∈ [0.1, 1.5] on half the images; crops shift up to
# 1/8 of the side. The strengths the papers' code sets are the section's ``augment_*`` keys (``AugmentOptions``).
BLUR_SIGMA, BLUR_PROB = (0.1, 1.5), 0.5
CROP_FRACTION = 0.125


@dataclass(frozen=True)
class AugmentOptions:
    """Strengths of the augmentations; the defaults are Improved CD's code (torchvision RandomResizedCrop scale
    0.08–1 and ratio 3/4–4/3; ColorJitter(0.8, 0.8, 0.8, 0.4) on 80% of images; RandomGrayscale 0.2)."""

    jitter_std: float = 0.05
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    color_strength: float = 0.8
    hue: float = 0.4
    color_prob: float = 0.8
    grayscale_prob: float = 0.2

    @classmethod
    def of(cls, section) -> AugmentOptions:
        """The options a baseline's config section sets (``<stage>.augment_*``)."""
        return cls(
            jitter_std=section.augment_jitter_std,
            crop_area=tuple(section.augment_crop_area),
            crop_ratio=tuple(section.augment_crop_ratio),
            color_strength=section.augment_color_strength,
            hue=section.augment_hue,
            color_prob=section.augment_color_prob,
            grayscale_prob=section.augment_grayscale_prob,
        )


def _per_sample(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def _uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device)


def flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a random half."""
    mask = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(_per_sample(x, mask), x.flip(-1), x)


def _hue_rotate(y: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each RGB image's chroma by ``turns`` of a full circle in YIQ space (a cheap stand-in for
    torchvision's HSV hue shift: same luma, hue moved by the same angle)."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=y.device, dtype=y.dtype
    )
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, y)
    angle = 2 * math.pi * turns.to(y.dtype)
    cos, sin = _per_sample(y, angle.cos())[:, 0], _per_sample(y, angle.sin())[:, 0]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * cos - q * sin, i * sin + q * cos], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def color(x: torch.Tensor, opts: AugmentOptions = AugmentOptions()) -> torch.Tensor:
    """Brightness, contrast, (RGB only) saturation and hue jitter on a random ``color_prob`` share, then a random
    ``grayscale_prob`` share turned grey (Improved CD's ColorJitter + RandomGrayscale)."""
    n, dev, k = len(x), x.device, opts.color_strength
    y = (x + 1) / 2
    apply = _per_sample(y, torch.rand(n, device=dev) < opts.color_prob)
    out = y * _per_sample(y, _uniform(n, 1 - k, 1 + k, dev))
    grey = out.mean(dim=1, keepdim=True)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * _per_sample(y, _uniform(n, 1 - k, 1 + k, dev)) + mean
    if x.shape[1] == 3:
        grey = out.mean(dim=1, keepdim=True)
        out = (out - grey) * _per_sample(y, _uniform(n, 1 - k, 1 + k, dev)) + grey
        if opts.hue:
            out = _hue_rotate(out.clamp(0, 1), _uniform(n, -opts.hue, opts.hue, dev))
    out = torch.where(apply, out.clamp(0, 1), y)
    if opts.grayscale_prob:
        grey_mask = _per_sample(y, torch.rand(n, device=dev) < opts.grayscale_prob)
        out = torch.where(grey_mask, out.mean(dim=1, keepdim=True).expand_as(out), out)
    return out * 2 - 1


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample each image at scale · grid + shift (normalised coordinates, reflection outside); ``scale`` is
    (B,) for both axes or (B, 2) for (x, y)."""
    scale = scale.reshape(len(x), -1).expand(len(x), 2)
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = scale[:, 0], scale[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def crop(x: torch.Tensor) -> torch.Tensor:
    """Random translation by whole pixels, up to 1/8 of the side (CIFAR's pad-4-and-crop at 32 px)."""
    n, side = len(x), x.shape[-1]
    max_px = max(1, int(side * CROP_FRACTION))
    pixels = torch.randint(-max_px, max_px + 1, (n, 2), device=x.device).to(x.dtype)
    return _affine(x, torch.ones(n, device=x.device, dtype=x.dtype), pixels * 2 / side)


def rescale(x: torch.Tensor, opts: AugmentOptions = AugmentOptions()) -> torch.Tensor:
    """Random resized crop: a window of ``crop_area`` of the image's area and aspect ratio in ``crop_ratio``
    (log-uniform, as torchvision), anywhere inside the image, resized back to full size."""
    n, dev = len(x), x.device
    area = _uniform(n, *opts.crop_area, dev)
    lo, hi = (math.log(r) for r in opts.crop_ratio)
    ratio = torch.exp(_uniform(n, lo, hi, dev))
    # Side fractions (width, height); a window wider or taller than the image is cut to it.
    scale = torch.stack([(area * ratio).sqrt(), (area / ratio).sqrt()], dim=1).clamp(max=1.0).to(x.dtype)
    shift = (torch.rand(n, 2, device=dev, dtype=x.dtype) * 2 - 1) * (1 - scale)
    return _affine(x, scale, shift)


def blur(x: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image σ on a random half (3×3 kernel below 64 px, 5×5 above)."""
    n, c, h, w = x.shape
    size = 3 if h < 64 else 5
    sigma = _uniform(n, *BLUR_SIGMA, x.device)
    sigma = torch.where(torch.rand(n, device=x.device) < BLUR_PROB, sigma, torch.full_like(sigma, 1e-3))
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma.to(x.dtype).unsqueeze(1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n·c, size)
    y = F.pad(x.reshape(1, n * c, h, w), (size // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


OPS = {"color": color, "flip": flip, "crop": crop, "rescale": rescale, "blur": blur}
TAKES_OPTIONS = ("color", "rescale")


def augment(x: torch.Tensor, names: tuple[str, ...], opts: AugmentOptions = AugmentOptions()) -> torch.Tensor:
    """Apply the named augmentations in the given order; each draws its own random parameters per sample."""
    for name in names:
        if name == "jitter":
            x = x + opts.jitter_std * torch.randn_like(x)
        else:
            x = OPS[name](x, opts) if name in TAKES_OPTIONS else OPS[name](x)
    return x
