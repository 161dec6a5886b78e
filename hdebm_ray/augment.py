"""Batched data augmentations with a fresh random draw per sample, on any device (ALGORITHMS §8).

Improved CD applies them to chain starts and, while sampling, every few Langevin steps (augmentation
transitions: colour, flip, rescale, blur); M-JEM to the classifier's batch (crop, flip). Images are (B, C, H, W)
in [-1, 1]; ``jitter`` is the toy2d counterpart (Gaussian noise on (B, D) vectors). Everything is vectorised: one
``grid_sample`` for crop and rescale, one grouped convolution for blur, so a transition costs about one small
conv layer, not a Python loop over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_AUGMENTS = ("color", "flip", "crop", "rescale", "blur")
VECTOR_AUGMENTS = ("jitter",)

# Strengths, chosen after SimCLR / Improved CD's pipelines (brightness, contrast, saturation ±40%, applied to 80% of
# images; crops keep 70–100% of the side; blur σ ∈ [0.1, 1.5] on half the images; crops shift up to 1/8 of the side).
COLOR_STRENGTH, COLOR_PROB = 0.4, 0.8
RESCALE_MIN = 0.7
BLUR_SIGMA, BLUR_PROB = (0.1, 1.5), 0.5
CROP_FRACTION = 0.125


def _per_sample(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def _uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device)


def flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a random half."""
    mask = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(_per_sample(x, mask), x.flip(-1), x)


def color(x: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and (RGB only) saturation jitter, on a random 80%."""
    n, dev = len(x), x.device
    y = (x + 1) / 2
    apply = _per_sample(y, torch.rand(n, device=dev) < COLOR_PROB)
    out = y * _per_sample(y, _uniform(n, 1 - COLOR_STRENGTH, 1 + COLOR_STRENGTH, dev))
    grey = out.mean(dim=1, keepdim=True)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * _per_sample(y, _uniform(n, 1 - COLOR_STRENGTH, 1 + COLOR_STRENGTH, dev)) + mean
    if x.shape[1] == 3:
        grey = out.mean(dim=1, keepdim=True)
        out = (out - grey) * _per_sample(y, _uniform(n, 1 - COLOR_STRENGTH, 1 + COLOR_STRENGTH, dev)) + grey
    out = torch.where(apply, out.clamp(0, 1), y)
    return out * 2 - 1


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample each image at scale · grid + shift (normalised coordinates, reflection outside)."""
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def crop(x: torch.Tensor) -> torch.Tensor:
    """Random translation by whole pixels, up to 1/8 of the side (CIFAR's pad-4-and-crop at 32 px)."""
    n, side = len(x), x.shape[-1]
    max_px = max(1, int(side * CROP_FRACTION))
    pixels = torch.randint(-max_px, max_px + 1, (n, 2), device=x.device).to(x.dtype)
    return _affine(x, torch.ones(n, device=x.device, dtype=x.dtype), pixels * 2 / side)


def rescale(x: torch.Tensor) -> torch.Tensor:
    """Random resized crop: a window of 70–100% of the side, anywhere inside the image, back to full size."""
    n = len(x)
    scale = _uniform(n, RESCALE_MIN, 1.0, x.device).to(x.dtype)
    shift = (torch.rand(n, 2, device=x.device, dtype=x.dtype) * 2 - 1) * (1 - scale).unsqueeze(1)
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


def augment(x: torch.Tensor, names: tuple[str, ...], jitter_std: float = 0.0) -> torch.Tensor:
    """Apply the named augmentations in a fixed order; each draws its own random parameters per sample."""
    for name in names:
        if name == "jitter":
            x = x + jitter_std * torch.randn_like(x)
        else:
            x = OPS[name](x)
    return x
