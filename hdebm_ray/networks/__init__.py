"""Network registry: builds each role's network (denoiser D, energy H, generator G1) from the config.

Images get the Improved-DDPM UNet and the SN-GAN ResNets; ``toy2d`` vectors get the MLP counterparts.
"""

from __future__ import annotations

from torch import nn

from ..config import Config, ConfigError
from ..core.diffusion import CosineSchedule
from .classifier_energy import ClassifierEnergy
from .mlp import MLPDenoiser, MLPEnergy, MLPGenerator
from .sngan import MultiScaleEnergy, ResNetEnergy, ResNetGenerator
from .unet import UNet, UNetGenerator

TOY_DIM = 2


def is_vector_data(cfg: Config) -> bool:
    return cfg.data.dataset == "toy2d"


def sample_shape(cfg: Config) -> tuple[int, ...]:
    """Shape of one data sample (without the batch dimension)."""
    if is_vector_data(cfg):
        return (TOY_DIM,)
    return (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)


def build_denoiser(cfg: Config) -> nn.Module:
    n = cfg.network
    if is_vector_data(cfg):
        alpha_bar = None
        if n.mlp.precondition:
            alpha_bar = CosineSchedule(cfg.diffusion.T, cfg.diffusion.cosine_s).alpha_bar
        return MLPDenoiser(dim=TOY_DIM, hidden=n.mlp.hidden, depth=n.mlp.depth, alpha_bar=alpha_bar)
    return build_unet(cfg, cfg.network.unet.dropout)


def build_unet(cfg: Config, dropout: float) -> UNet:
    u = cfg.network.unet
    return UNet(
        in_channels=cfg.data.channels,
        resolution=cfg.data.resolution,
        channels=u.channels,
        channel_mult=u.channel_mult,
        num_res_blocks=u.num_res_blocks,
        attn_resolutions=u.attn_resolutions,
        num_heads=u.num_heads,
        num_head_channels=u.num_head_channels,
        resblock_updown=u.resblock_updown,
        dropout=dropout,
    )


def latent_shape(cfg: Config) -> tuple[int, ...]:
    """Shape of one z1: a vector of ``z_dim`` (SN-GAN / MLP generator) or an image (UNet-bodied G1)."""
    if cfg.network.generator.kind == "unet":
        return sample_shape(cfg)
    return (cfg.network.generator.z_dim,)


def build_energy(cfg: Config, num_classes: int = 0, multiscale: bool = False) -> nn.Module:
    """H; with ``num_classes`` M-JEM's classifier with a separate energy head on the same trunk; ``multiscale``
    (or ``network.energy.multiscale``) sums energies at full, half and quarter resolution."""
    e = cfg.network.energy
    if is_vector_data(cfg):
        net = MLPEnergy(
            dim=TOY_DIM,
            hidden=e.width,
            depth=cfg.network.mlp.depth,
            fourier_features=e.fourier_features,
            fourier_scale=e.fourier_scale,
        )
    elif e.multiscale or multiscale:
        if num_classes:
            raise ConfigError(
                "M-JEM needs a single-scale trunk: set network.energy.multiscale and mjem.multiscale false"
            )
        net = MultiScaleEnergy(in_channels=cfg.data.channels, resolution=cfg.data.resolution, width=e.width)
    else:
        net = ResNetEnergy(in_channels=cfg.data.channels, resolution=cfg.data.resolution, width=e.width)
    return ClassifierEnergy(net, num_classes) if num_classes else net


def build_generator(cfg: Config) -> nn.Module:
    g = cfg.network.generator
    if is_vector_data(cfg):
        return MLPGenerator(
            dim=TOY_DIM, z_dim=g.z_dim, hidden=g.width, depth=cfg.network.mlp.depth, out_scale=g.out_scale
        )
    if g.kind == "unet":  # trained by regression onto banked samples: no dropout in the map from z1
        return UNetGenerator(build_unet(cfg, dropout=0.0), g.out_scale)
    return ResNetGenerator(
        out_channels=cfg.data.channels,
        resolution=cfg.data.resolution,
        z_dim=g.z_dim,
        width=g.width,
        out_scale=g.out_scale,
    )
