"""The diffusion UNet predicting x0, as HDEBM's truncated diffusion uses: Improved DDPM's (Nichol & Dhariwal 2021)
and, with two options, ADM's (Dhariwal & Nichol 2021, the paper's 64/128 px networks).

Residual blocks with scale-shift timestep conditioning (GroupNorm(h)·(1 + w) + b), multi-head self-attention
at the listed resolutions, channel widths ``channels · channel_mult[level]``. ADM's options: ``num_head_channels``
(heads of that many channels each instead of ``num_heads``) and ``resblock_updown`` (BigGAN-style residual
blocks that resample inside, in place of the strided / upsampling convolutions). Zero-initialised output layers
make every block start as the identity, which keeps deep configurations stable at initialisation. Parameter
counts equal the reference implementations' for the same settings (tests/test_networks.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN → SiLU → [resample] → conv, timestep scale-shift, GN → SiLU → dropout → conv, plus the (resampled) input.
    ``resample``: None, "down" (2×2 average pool) or "up" (nearest ×2), applied to both paths as ADM does."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.resample = resample
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))
        self.out_norm = group_norm(c_out)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(c_out, c_out, 3, padding=1))
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        # ADM resamples between the activation and the conv (Improved DDPM's blocks never resample).
        h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x))))
        x = self._resample(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over positions: ``num_head_channels`` per head if > 0, else ``num_heads``."""

    def __init__(self, ch: int, num_heads: int, num_head_channels: int = 0):
        super().__init__()
        if num_head_channels > 0:
            if ch % num_head_channels:
                raise ValueError(f"{ch} channels do not split into heads of {num_head_channels}")
            num_heads = ch // num_head_channels
        self.num_heads = num_heads if ch % num_heads == 0 else 1
        self.norm = group_norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv1d(ch, ch, 1))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stack(nn.ModuleList):
    """Layers that all take (h, emb)."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb)
        return h


class UNet(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        channels: int = 128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks: int = 3,
        attn_resolutions=(16, 8),
        num_heads: int = 4,
        num_head_channels: int = 0,
        resblock_updown: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.channels = channels
        emb_dim = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)

        def attention(c: int) -> Attention:
            return Attention(c, num_heads, num_head_channels)

        self.down = nn.ModuleList()
        skips, res = [ch], resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if res in attn_resolutions:
                    layers.append(attention(ch))
                self.down.append(Stack(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, ch, emb_dim, dropout, "down") if resblock_updown else Downsample(ch)
                self.down.append(Stack([down]))
                skips.append(ch)
                res //= 2

        self.middle = Stack([ResBlock(ch, ch, emb_dim, dropout), attention(ch), ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if res in attn_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ch, emb_dim, dropout, "up") if resblock_updown else Upsample(ch))
                    res *= 2
                self.up.append(Stack(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.channels))
        h = self.input_conv(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class UNetGenerator(nn.Module):
    """G1 with the diffusion model's UNet body (HDEBM D.2, 64/128 px): an image-shaped latent z1 through the UNet
    at a fixed time input, tanh · out_scale."""

    def __init__(self, unet: UNet, out_scale: float):
        super().__init__()
        self.unet, self.out_scale = unet, out_scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(len(z), device=z.device)
        return torch.tanh(self.unet(z, t)) * self.out_scale
