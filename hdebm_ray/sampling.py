"""Drawing samples from any stage's checkpoint with that stage's own sampler, and writing them as PNG grids.

- ``diffusion`` / ``distill``: a truncated diffusion cannot start from pure noise; its sampler maps x_T' to x_0.
  We show what it does to data: x ~ data, x_T' = α_T'·x + σ_T'·z, then N0 DDIM steps (diffusion) or the one
  distilled step (distill) — the "re-imagination" G2 performs inside HDEBM.
- ``stage1``: fresh z1, z2, X = G(z1, z2) + Y_K after K Langevin steps on Y (the training sampler,
  docs/algorithms.md §7).
- ``stage2``: the joint sampler on (Y, z1, z2) of Stage 2.
- ``mebm`` / ``mjem`` / ``icd``, two protocols (``<stage>.eval_protocol``): ``fresh``, ``sample_steps`` SGLD
  steps from the stage's chain_init (p0 = N(μ, Σ) or U[-1, 1]) with Improved CD's augmentation transitions every
  ``sample_augment_every`` steps; or ``buffer``, the replay buffer's persistent chains as they were at the
  checkpoint (the snapshot ``<stage dir>/bank/bank_step_<step>.arrow`` next to it), as M-EBM reports its FID.
Weights: raw or EMA (``eval.use_ema`` names the stages sampled with EMA weights); ``Sampler.weights`` says which.
Samples are clipped to [-1, 1]; ``images.save_grid`` writes them (toy2d as a scatter plot).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import storage
from .checkpoint import load_config_of, load_meta, load_states
from .config import Config
from .data import build_dataset, random_images
from .diffusion import CosineSchedule, ddim_sample, noise_to_truncation
from .ebm import HatGenerator
from .images import save_grid  # noqa: F401 - sampling's public API: sample, then save
from .langevin import sample_joint
from .networks import build_denoiser, build_energy, build_generator, sample_shape
from .slot_store import SlotStore, snapshot_name
from .stages import BASELINES
from .stages.hdebm_common import latents
from .stages.hdebm_stage1 import sample_stage1
from .stages.hdebm_stage2 import joint_sampler_kwargs
from .stages.mjem import num_classes
from .stages.replay_ebm import ChainInit, sample_replay_ebm


def default_device(name: str | None = None) -> torch.device:
    """``name`` if given, else the GPU when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# The components each stage trains with an EMA copy (G1 is frozen in Stage 2: its raw weights are its EMA).
EMA_COMPONENTS = {"stage1": ("energy", "generator"), "stage2": ("energy",), **{b: ("energy",) for b in BASELINES}}
PROTOCOLS = ("buffer", "fresh")


def buffer_snapshot_location(checkpoint: str | Path, step: int) -> str:
    """Where a replay-buffer stage's snapshot of ``step`` lies: ``bank/`` beside the checkpoint directory."""
    parent = str(checkpoint).rstrip("/").rsplit("/", 1)[0]
    return f"{parent}/bank/{snapshot_name(step)}"


class Sampler:
    """``sample(n, seed)`` for the stage a checkpoint belongs to; ``base(n, seed)`` is the chain start G(z).

    ``use_ema``: True / False, or None for ``eval.use_ema``'s choice for this stage (raw weights where the
    checkpoint has no EMA). ``protocol`` (baselines): ``buffer`` or ``fresh``, None for ``<stage>.eval_protocol``.
    ``origin``: where the checkpoint lives, if ``ckpt_dir`` is a local copy (the buffer snapshot is beside it).
    """

    def __init__(self, ckpt_dir: str | Path, device="cpu", use_ema: bool | None = None, protocol=None, origin=None):
        self.cfg: Config = load_config_of(ckpt_dir)
        meta = load_meta(ckpt_dir)
        self.stage = meta["stage"]
        self.device = torch.device(device)
        names = {
            "diffusion": ["denoiser"],
            "distill": ["denoiser"],
            "stage1": ["denoiser", "generator", "energy"],
            "stage2": ["denoiser", "generator", "energy"],
            **{name: ["energy", "chain_init"] for name in BASELINES},
        }
        if self.stage not in names:
            raise ValueError(f"checkpoint '{ckpt_dir}' is of stage {self.stage!r}, which has no sampler")
        states = load_states(ckpt_dir, names[self.stage], map_location=self.device)
        self.weights = self._load_ema(ckpt_dir, states, use_ema)
        self.protocol = "fresh"
        if self.stage in BASELINES:  # an energy and where its chains start, no denoiser
            section = getattr(self.cfg, self.stage)
            self.init = ChainInit.from_state_dict(sample_shape(self.cfg), states["chain_init"], section.p0_clamp)
            classes = num_classes(self.cfg) if self.stage == "mjem" else 0
            self.energy = build_energy(self.cfg, classes, section.multiscale).to(self.device).eval()
            self.energy.load_state_dict(states["energy"])
            self.protocol = protocol or section.eval_protocol
            if self.protocol not in PROTOCOLS:
                raise ValueError(f"unknown sampling protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
            if self.protocol == "buffer":  # the samples are the chains themselves: no weights are involved
                self._load_buffer(buffer_snapshot_location(origin or ckpt_dir, int(meta["step"])))
                self.weights = "none"
            return
        d = self.cfg.diffusion
        self.schedule = CosineSchedule(d.T, d.cosine_s)
        self.denoiser = build_denoiser(self.cfg).to(self.device).eval()
        self.denoiser.load_state_dict(states["denoiser"])
        if "generator" in states:
            g1 = build_generator(self.cfg).to(self.device).eval()
            g1.load_state_dict(states["generator"])
            self.hat = HatGenerator(g1, self.denoiser, self.schedule, d.T_trunc)
            self.energy = build_energy(self.cfg).to(self.device).eval()
            self.energy.load_state_dict(states["energy"])

    def _load_ema(self, ckpt_dir, states: dict, use_ema: bool | None) -> str:
        """Swap in the EMA weights where wanted and saved; returns which weights the sampler uses."""
        wanted = self.stage in self.cfg.eval.use_ema if use_ema is None else use_ema
        if not wanted:
            return "raw"
        components = EMA_COMPONENTS.get(self.stage, ())
        present = [c for c in components if (Path(ckpt_dir) / f"{c}_ema.pt").is_file()]
        if len(present) < len(components) or not components:
            if use_ema:  # asked for explicitly: say why it cannot be done
                raise FileNotFoundError(
                    f"checkpoint '{ckpt_dir}' ({self.stage}) has no EMA weights"
                    + (" (its stage keeps none)" if not components else f" ({self.stage}.ema_halflife_kimg = 0?)")
                )
            return "raw"
        ema = load_states(ckpt_dir, [f"{c}_ema" for c in components], map_location=self.device)
        for c in components:  # AveragedModel state: "module.<key>" plus n_averaged
            states[c] = {k[7:]: v for k, v in ema[f"{c}_ema"].items() if k.startswith("module.")}
        return "ema"

    def _load_buffer(self, location: str) -> None:
        if not storage.exists(location):
            raise FileNotFoundError(
                f"no replay buffer snapshot at {location} for this {self.stage} checkpoint (sample with the fresh "
                "protocol instead: --protocol fresh)"
            )
        store, _ = SlotStore.load(location)
        filled = store.written_step >= 0
        self.buffer = torch.from_numpy(store.arrays["x"][filled])
        # A fixed order over the slots: consecutive seeds read consecutive, distinct slots.
        self.buffer_order = torch.randperm(len(self.buffer), generator=torch.Generator().manual_seed(self.cfg.run.seed))

    @property
    def max_samples(self) -> int | None:
        """How many distinct samples there are (the buffer's size), None when unbounded."""
        return len(self.buffer) if self.protocol == "buffer" else None

    def _latents(self, n: int, seed: int):
        g = torch.Generator(device=self.device).manual_seed(seed)
        return latents(self.cfg, n, sample_shape(self.cfg), self.device, g)

    def _data(self, n: int, seed: int) -> torch.Tensor:
        if not hasattr(self, "dataset"):
            self.dataset = build_dataset(self.cfg)
        return random_images(self.dataset, n, seed).to(self.device)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        return self.sample_with_start(n, seed)[0]

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples and their chain starts: G(z) for the same latents (HDEBM), the chain_init draws (baselines), or
        None (the diffusion stages)."""
        if self.stage in BASELINES:
            torch.manual_seed(seed)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            if self.protocol == "buffer":  # the chains as training left them; starts: p0 draws of the same count
                slots = self.buffer_order[(torch.arange(n) + seed) % len(self.buffer)]
                x0 = self.init.sample(n, generator=gen, device=self.device)
                return self.buffer[slots].to(self.device).clamp(-1, 1), x0.clamp(-1, 1)
            section = getattr(self.cfg, self.stage)
            x0, x = sample_replay_ebm(self.energy, self.init, section, n, gen, self.device)
            return x.clamp(-1, 1), x0.clamp(-1, 1)
        t_trunc = self.cfg.diffusion.T_trunc
        if self.stage in ("diffusion", "distill"):
            x = self._data(n, seed)
            g = torch.Generator(device=self.device).manual_seed(seed + 1)
            z = noise_to_truncation(self.schedule, x, torch.randn(x.shape, generator=g, device=self.device), t_trunc)
            steps = self.cfg.distill.n0_steps if self.stage == "diffusion" else 1
            with torch.no_grad():
                return ddim_sample(self.denoiser, z, self.schedule, t_trunc, steps).clamp(-1, 1), None
        z1, z2 = self._latents(n, seed)
        torch.manual_seed(seed)
        if self.stage == "stage1":
            x_gen, y = sample_stage1(self.energy, self.hat, z1, z2, self.cfg.stage1.langevin)
            return (x_gen + y).clamp(-1, 1), x_gen.clamp(-1, 1)
        with torch.no_grad():  # deterministic: the Langevin noise that follows is unchanged
            start = self.hat(z1, z2)
        y, _, _, x_gen = sample_joint(
            self.energy, self.hat, z1, z2, modules=(self.hat,), **joint_sampler_kwargs(self.cfg)
        )
        return (x_gen + y).clamp(-1, 1), start.clamp(-1, 1)
