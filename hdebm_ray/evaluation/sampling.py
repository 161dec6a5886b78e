"""Drawing samples from any stage's checkpoint with that stage's own sampler (``stages.SAMPLERS``), and writing
them as PNG grids.

``Sampler`` loads the checkpoint's config and the state_dicts its stage's sampler is built from, swaps in the EMA
weights where wanted, and hands sampling to it. What each stage's sampler does is documented with it: the
diffusion stages map noised data at T' back to x_0 (a truncated diffusion cannot start from noise); Stage 1 and
Stage 2 run their Langevin chains from fresh latents; the baselines run fresh SGLD chains or read their replay
buffer's snapshot (``<stage>.eval_protocol``). Weights: raw or EMA (``eval.use_ema`` names the stages sampled with
EMA weights); ``Sampler.weights`` says which. Samples are clipped to [-1, 1]; ``images.save_grid`` writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..io.checkpoint import CheckpointError, ema_weights, load_config_of, load_meta, load_states, weights_mismatch
from ..stages import sampler_class
from .images import save_grid  # noqa: F401 - sampling's public API: sample, then save


def default_device(name: str | None = None) -> torch.device:
    """``name`` if given, else the GPU when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class Sampler:
    """``sample(n, seed)`` for the stage a checkpoint belongs to, and ``sample_with_start`` with its chain starts.

    ``use_ema``: True / False, or None for ``eval.use_ema``'s choice for this stage (raw weights where the
    checkpoint has no EMA). ``protocol`` (baselines): ``buffer`` or ``fresh``, None for ``<stage>.eval_protocol``.
    ``origin``: where the checkpoint lives, if ``ckpt_dir`` is a local copy (the buffer snapshot is beside it).
    ``energy`` / ``denoiser`` / ``schedule``: the sampler's networks, None where its stage has none.
    """

    def __init__(self, ckpt_dir: str | Path, device="cpu", use_ema: bool | None = None, protocol=None, origin=None):
        self.cfg: Config = load_config_of(ckpt_dir)
        meta = load_meta(ckpt_dir)
        self.stage, self.device = meta["stage"], torch.device(device)
        self.step, self.nimg = int(meta["step"]), int(meta["nimg"])
        try:
            cls = sampler_class(self.stage)
        except ValueError as e:
            raise CheckpointError(f"checkpoint '{ckpt_dir}': {e}") from None
        states = load_states(ckpt_dir, list(cls.components), map_location=self.device)
        self.weights = self._load_ema(ckpt_dir, states, use_ema, cls.ema_components)
        location = str(origin or ckpt_dir)
        try:
            self.impl = cls(self.cfg, states, self.device, location, int(meta["step"]), protocol)
        except RuntimeError as e:
            raise weights_mismatch(origin or ckpt_dir, e) from None
        if not self.impl.uses_weights:
            self.weights = "none"
        self.start_name = cls.start_name
        self.energy = getattr(self.impl, "energy", None)
        self.denoiser = getattr(self.impl, "denoiser", None)
        self.schedule = getattr(self.impl, "schedule", None)

    def _load_ema(self, ckpt_dir, states: dict, use_ema: bool | None, components: tuple[str, ...]) -> str:
        """Swap in the EMA weights where wanted and saved; returns which weights the sampler uses."""
        wanted = self.stage in self.cfg.eval.use_ema if use_ema is None else use_ema
        if not wanted:
            return "raw"
        ema = ema_weights(ckpt_dir, list(components), map_location=self.device)
        if ema is None:
            if use_ema:  # asked for explicitly: say why it cannot be done
                raise FileNotFoundError(
                    f"checkpoint '{ckpt_dir}' ({self.stage}) has no EMA weights"
                    + (" (its stage keeps none)" if not components else f" ({self.stage}.ema_halflife_kimg = 0?)")
                )
            return "raw"
        states.update(ema)
        return "ema"

    @property
    def protocol(self) -> str:
        return self.impl.protocol

    @property
    def max_samples(self) -> int | None:
        """How many distinct samples there are (a replay buffer's size), None when unbounded."""
        return self.impl.max_samples

    def caption(self) -> str:
        """One line saying what a grid of this sampler's samples shows: stage, step, images seen, how drawn."""
        return (
            f"{self.stage} step {self.step} ({self.nimg / 1000:g} kimg), {self.weights} weights: {self.impl.describe()}"
        )

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        return self.sample_with_start(n, seed)[0]

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples and their chain starts: G(z) for the same latents (HDEBM), the chain_init draws (baselines), or
        None (the diffusion stages)."""
        return self.impl.sample_with_start(n, seed)
