"""Small configs shared by the Ray integration tests."""

from __future__ import annotations


def small_digits_overrides(storage: str, name: str) -> list[str]:
    """A digits config small enough for a 2-worker CPU TorchTrainer in seconds per step."""
    return [
        f"run.storage_path={storage}",
        f"run.name={name}",
        "network.unet.channels=16",
        "network.unet.channel_mult=[1,2]",
        "network.unet.attn_resolutions=[8]",
        "diffusion.batch_size=16",
        "distill.batch_size=16",
        "distill.eval_batch=16",
    ]
