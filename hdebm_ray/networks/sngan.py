"""SN-GAN ResNets without spectral norm: the energy net H and the generator G1, as Hat EBM builds them.

The energy net is the SN-GAN discriminator with no normalisation (pre-activation residual blocks, average-pool
downsampling, ReLU → global average pool → linear head without bias). Its layout follows Hat EBM's EBMSNGAN nets:
up to 32 px, constant width, downsampling to 8×8 then two plain blocks (32 px: 2 down + 2 plain); from 64 px,
five downsampling blocks whose widths double from ``width`` to 16·``width`` (64 px ends at 2×2), then one plain
block per further octave (128 px: one at 4×4). ``MultiScaleEnergy`` sums separate nets at full, half and quarter
resolution (Improved CD). The generator is the SN-GAN generator with batch norm removed: linear → 4×4 →
upsampling residual blocks (ReLU, upsample, conv, ReLU, conv; a learned 1×1 shortcut on the upsampled input) →
ReLU → conv → tanh · out_scale (Hat EBM uses out_scale = 2). Up to 32 px its width is constant; above, Hat EBM's
64/128 px generators halve it per block, down to ``width`` / 16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EnergyBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool = False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or downsample) else None

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:
            # The stem pools before its 1x1 conv; later blocks convolve then pool (SN-GAN's OptimizedBlock).
            s = self.shortcut(F.avg_pool2d(s, 2) if self.first else s)
            if self.downsample and not self.first:
                s = F.avg_pool2d(s, 2)
        return h + s


def energy_widths(resolution: int, width: int) -> list[tuple[int, bool]]:
    """(channels, downsamples) of each block after the stem, and the stem's channels first (Hat EBM's layouts)."""
    octaves = int(math.log2(resolution))
    if resolution <= 32:
        n_down = max(1, octaves - 3)
        return [(width, True)] * n_down + [(width, False)] * 2
    down = [(width * 2**i, True) for i in range(5)]
    return down + [(width * 16, False)] * (octaves - 6)


class ResNetEnergy(nn.Module):
    """H(x) -> (B,) energy (layouts: the module docstring)."""

    def __init__(self, *, in_channels: int, resolution: int, width: int = 128):
        super().__init__()
        layout = energy_widths(resolution, width)
        blocks = [EnergyBlock(in_channels, layout[0][0], downsample=True, first=True)]
        c = layout[0][0]
        for c_out, down in layout[1:]:
            blocks.append(EnergyBlock(c, c_out, downsample=down))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = c
        self.head = nn.Linear(c, 1, bias=False)

    def features(self, x):
        return F.relu(self.blocks(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(1)


class MultiScaleEnergy(nn.Module):
    """Sum of energies of separate nets on the image at full, half and quarter resolution (Improved CD)."""

    def __init__(self, *, in_channels: int, resolution: int, width: int = 128):
        super().__init__()
        self.nets = nn.ModuleList(
            ResNetEnergy(in_channels=in_channels, resolution=max(resolution // 2**k, 8), width=width) for k in range(3)
        )

    def forward(self, x):
        total = 0
        for k, net in enumerate(self.nets):
            total = total + net(F.avg_pool2d(x, 2**k) if k else x)
        return total


class GeneratorBlock(nn.Module):
    """SN-GAN's upsampling block without batch norm: ReLU → ×2 → conv → ReLU → conv, plus the upsampled input
    through a learned 1×1 conv (Hat EBM: bilinear upsampling)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    @staticmethod
    def up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(self.up(F.relu(x)))))
        return h + self.shortcut(self.up(x))


def generator_widths(resolution: int, width: int) -> list[int]:
    """Channels after each upsampling block from the 4×4 seed of ``width`` channels: constant up to 32 px; above,
    Hat EBM's halving (64 px: w/2 … w/16; 128 px: w, w/2, …, w/16)."""
    n_up = int(math.log2(resolution)) - 2
    if resolution <= 32:
        return [width] * n_up
    halvings = [max(width // 2**i, 1) for i in range(1, 5)]
    return [width] * (n_up - 4) + halvings


class ResNetGenerator(nn.Module):
    """G1(z) -> image in [-out_scale, out_scale]: 4×4 seed, one upsampling block per octave."""

    def __init__(
        self, *, out_channels: int, resolution: int, z_dim: int = 128, width: int = 256, out_scale: float = 2.0
    ):
        super().__init__()
        self.z_dim, self.width, self.out_scale = z_dim, width, out_scale
        self.fc = nn.Linear(z_dim, 4 * 4 * width)
        widths = generator_widths(resolution, width)
        self.blocks = nn.Sequential(
            *[GeneratorBlock(c_in, c_out) for c_in, c_out in zip([width, *widths[:-1]], widths, strict=True)]
        )
        self.out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).reshape(z.shape[0], self.width, 4, 4)
        h = self.out(F.relu(self.blocks(h)))
        return torch.tanh(h) * self.out_scale
