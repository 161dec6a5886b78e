"""Networks: shapes, the Improved-DDPM UNet's attention placement and conditioning, energy heads."""

from __future__ import annotations

import pytest
import torch

from hdebm_ray.config import load_config
from hdebm_ray.networks import build_denoiser, build_energy, build_generator, sample_shape
from hdebm_ray.networks.sngan import MultiScaleEnergy, ResNetEnergy
from hdebm_ray.networks.unet import Attention, UNet


def test_unet_attention_at_listed_resolutions_and_time_conditioning():
    net = UNet(
        in_channels=3,
        resolution=32,
        channels=16,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16, 8),
        num_heads=4,
    )
    seen = []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    x = torch.randn(2, 3, 32, 32)
    # zero-initialised output layer: perturb so the output depends on the input and on t
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    y1 = net(x, torch.tensor([10.0, 10.0]))
    y2 = net(x, torch.tensor([200.0, 200.0]))
    assert y1.shape == x.shape
    assert set(seen) == {16, 8, 4}  # 16 and 8 as listed, 4 in the middle block
    assert not torch.allclose(y1, y2)  # the timestep changes the output


def test_builders_follow_the_dataset():
    img = load_config("digits")
    assert sample_shape(img) == (1, 16, 16)
    x = torch.randn(3, *sample_shape(img))
    assert build_denoiser(img)(x, torch.ones(3)).shape == x.shape
    assert build_energy(img)(x).shape == (3,)
    g = build_generator(img)
    out = g(torch.randn(3, img.network.generator.z_dim))
    assert out.shape == x.shape and out.abs().max() <= img.network.generator.out_scale

    toy = load_config(overrides=["data.dataset=toy2d"])
    v = torch.randn(5, 2)
    assert build_denoiser(toy)(v, torch.ones(5)).shape == (5, 2)
    assert build_energy(toy)(v).shape == (5,)
    assert build_generator(toy)(torch.randn(5, toy.network.generator.z_dim)).shape == (5, 2)


def test_multiscale_energy_is_sum_of_three_scales():
    ms = MultiScaleEnergy(in_channels=1, resolution=32, width=8)
    x = torch.randn(4, 1, 32, 32)
    parts = [net(torch.nn.functional.avg_pool2d(x, 2**k) if k else x) for k, net in enumerate(ms.nets)]
    assert torch.allclose(ms(x), sum(parts))
    assert isinstance(ms.nets[2], ResNetEnergy)


# Parameter counts of the reference architectures for each GPU preset's settings: Hat EBM's nets.py (EBMSNGAN32
# at ngf 512, EBMSNGAN64 at ngf 1024, the small EBMSNGAN128; GenSNGAN32 at ngf 256 without batch norm), counted
# layer by layer; the UNets built from openai/improved-diffusion (CIFAR-10) and openai/guided-diffusion (ADM, 64
# and 128 px, x0 output) and counted.
REFERENCE_PARAMETERS = {
    "cifar10": {"denoiser": 52_542_979, "energy": 16_798_208, "generator": 4_273_155},
    "celeba64": {"denoiser": 295_131_267, "energy": 19_542_720, "generator": 295_131_267},
    "imagenet128": {"denoiser": 105_195_139, "energy": 38_419_136, "generator": 105_195_139},
}


@pytest.mark.parametrize("preset", sorted(REFERENCE_PARAMETERS))
def test_preset_networks_have_the_reference_architectures_parameter_counts(preset):
    from hdebm_ray.networks import build_denoiser, build_energy, build_generator

    cfg = load_config(preset)
    with torch.device("meta"):  # sizes only: no memory for ~300M parameters
        nets = {"denoiser": build_denoiser(cfg), "energy": build_energy(cfg), "generator": build_generator(cfg)}
    for role, net in nets.items():
        count = sum(p.numel() for p in net.parameters())
        expected = REFERENCE_PARAMETERS[preset][role]
        assert abs(count - expected) <= 0.01 * expected, (preset, role, count, expected)
