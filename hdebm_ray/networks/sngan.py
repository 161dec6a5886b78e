"""SN-GAN ResNets without spectral norm: the energy net H and the generator G1 (Hat EBM's nets.py).

The energy net is the SN-GAN discriminator with no normalisation (pre-activation residual blocks, average-pool
downsampling, ReLU → global average pool → linear head without bias); ``MultiScaleEnergy`` sums separate nets at
full, half and quarter resolution (Improved CD). The generator is the SN-GAN generator with batch norm removed:
linear → 4×4 → upsampling residual blocks → conv → tanh · out_scale (Hat EBM uses out_scale = 2).
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


class ResNetEnergy(nn.Module):
    """H(x) -> (B,) energy. Downsamples to 8×8 (at least once), then two plain blocks."""

    def __init__(self, *, in_channels: int, resolution: int, width: int = 128):
        super().__init__()
        n_down = max(1, int(math.log2(resolution)) - 3)
        # 32 px keeps all widths equal (SN-GAN 32); larger images double per downsampling up to 16x.
        grow = resolution > 32
        chans = [width * (min(2**i, 16) if grow else 1) for i in range(n_down + 1)]
        blocks = [EnergyBlock(in_channels, chans[0], downsample=True, first=True)]
        for i in range(1, n_down):
            blocks.append(EnergyBlock(chans[i - 1], chans[i], downsample=True))
        c = chans[n_down - 1]
        blocks += [EnergyBlock(c, c, downsample=False), EnergyBlock(c, c, downsample=False)]
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
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h = self.conv2(F.relu(self.conv1(F.relu(up))))
        return h + self.shortcut(up)


class ResNetGenerator(nn.Module):
    """G1(z) -> image in [-out_scale, out_scale]: 4×4 seed, one upsampling block per octave."""

    def __init__(
        self, *, out_channels: int, resolution: int, z_dim: int = 128, width: int = 256, out_scale: float = 2.0
    ):
        super().__init__()
        self.z_dim, self.width, self.out_scale = z_dim, width, out_scale
        self.fc = nn.Linear(z_dim, 4 * 4 * width)
        self.blocks = nn.Sequential(*[GeneratorBlock(width, width) for _ in range(int(math.log2(resolution)) - 2)])
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).reshape(z.shape[0], self.width, 4, 4)
        h = self.out(F.relu(self.blocks(h)))
        return torch.tanh(h) * self.out_scale
