"""The replay-buffer EBMs of docs/algorithms.md §8 on one loop: M-EBM ("mebm"), M-JEM ("mjem") and Improved CD ("icd").

Each step, on every rank's own batch: chain starts drawn from the replay buffer (the bank actor in replay mode),
a fraction ρ of them re-initialised from the section's ``chain_init`` (p0 = N(μ, Σ) of the training set for
M-EBM / M-JEM, U[-1, 1] for Improved CD); K SGLD steps x ← x − α∇E(x) + σξ on the bare energy net; the CD update
E(x⁺) − E(x⁻) + α_reg(E(x⁺)² + E(x⁻)²); the chain ends pushed back into the buffer. The algorithms differ only in
hooks: M-JEM adds a cross-entropy batch to the update (``mjem.py``), Improved CD augments the chain starts and
adds the KL term (``icd.py``). Samples at test time: chains from ``chain_init`` run ``sample_steps`` SGLD steps,
with an augmentation transition every ``sample_augment_every`` steps (Improved CD's Algorithm 2).
"""

from __future__ import annotations

import numpy as np
import torch

from ..bank.service import BankSpec
from ..bank.store import SlotStore, snapshot_location
from ..config import Config, check_stage
from ..contracts import WorkerContext
from ..core.gaussian_init import GaussianInit, cached_gaussian
from ..core.langevin import StepStats, frozen, sample_langevin
from ..core.ranks import barrier
from ..data.augment import AugmentOptions, augment
from ..data.datasets import build_dataset, cache_root, data_fingerprint
from ..io import storage
from ..networks import build_energy, sample_shape
from .base import Backoff, SamplerBase, StageBase
from .ebm_common import energy_trainer, fixed_sample_grids, restore_snapshot, toy2d_tick_metrics
from .reported import REPLAY

DATA_RANGE = (-1.0, 1.0)


def fit_p0(cfg: Config, section) -> GaussianInit:
    d = cfg.data
    dataset = build_dataset(cfg)
    name = f"p0-{d.dataset}-{d.resolution}px-{d.channels}ch-full{section.p0_max_full_dim}-rank{section.p0_rank}"
    if section.p0_cov_jitter:
        name += f"-jitter{section.p0_cov_jitter:g}"
    if files := data_fingerprint(cfg, dataset):
        name += f"-files{files}"
    return cached_gaussian(
        dataset,
        cache_root(cfg) / "p0",
        name,
        section.p0_max_full_dim,
        section.p0_rank,
        cov_jitter=section.p0_cov_jitter,
    )


class ChainInit:
    """Where fresh chains start: p0 = N(μ, Σ) fitted to the data (cached), or uniform noise on [-1, 1]; p0 draws
    are clamped to the data range when ``clamp`` (M-EBM's code)."""

    def __init__(self, shape: tuple[int, ...], p0: GaussianInit | None = None, clamp: bool = False):
        self.shape, self.p0, self.clamp = shape, p0, clamp

    @classmethod
    def for_section(cls, cfg: Config, section) -> ChainInit:
        p0 = fit_p0(cfg, section) if section.chain_init == "p0" else None
        return cls(sample_shape(cfg), p0, section.p0_clamp)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        if self.p0 is not None:
            x = self.p0.sample(n, generator=generator, device=device)
            return x.clamp(*DATA_RANGE) if self.clamp else x
        return torch.rand(n, *self.shape, generator=generator, device=device) * 2 - 1

    def state_dict(self) -> dict:
        return self.p0.state_dict() if self.p0 is not None else {}

    @classmethod
    def from_state_dict(cls, shape: tuple[int, ...], state: dict, clamp: bool = False) -> ChainInit:
        return cls(shape, GaussianInit.from_state_dict(state) if state else None, clamp)


def sgld_chain(energy, x0: torch.Tensor, sgld, stats=None, steps: int | None = None) -> torch.Tensor:
    """K (or ``steps``) SGLD steps x ← x − α∇E(x) + σξ (clipped drift, clamped chains if set), parameters frozen."""
    with frozen(energy):
        k = sgld.steps if steps is None else steps
        bounds = DATA_RANGE if sgld.clamp else None
        return sample_langevin(
            energy, x0, k, sgld.step_size, sgld.noise_std, sgld.drift_clip, stats, bounds, sgld.grad_clamp
        )


def sample_replay_ebm(energy, init: ChainInit, section, n: int, generator=None, device=None):
    """Test-time samples: (chain starts, samples) after ``sample_steps`` SGLD steps (default K) from chain_init,
    with an augmentation transition before every ``sample_augment_every`` steps (0 = none).

    Training chains persist in the buffer over many steps; a checkpoint's sampler has only chain_init to start
    from, so a longer chain than K gets closer to what the buffer holds."""
    x0 = init.sample(n, generator=generator, device=device)
    steps = section.sample_steps or section.langevin.steps
    every = section.sample_augment_every or steps
    x, done = x0, 0
    while done < steps:
        if section.sample_augment_every:
            x = augment(x, section.augment, AugmentOptions.of(section))
        x = sgld_chain(energy, x, section.langevin, steps=min(every, steps - done))
        done += every
    return x0, x


class ReplayEBMSampler(SamplerBase):
    """A baseline's samples by its protocol (``<stage>.eval_protocol``): ``fresh``, test-time SGLD chains from its
    chain_init (``sample_replay_ebm``); or ``buffer``, the replay buffer's persistent chains as they were at the
    checkpoint (the snapshot ``<stage dir>/bank/bank_step_<step>.arrow`` beside it), as M-EBM reports its FID."""

    stage = "mebm"
    components = ("energy", "chain_init")
    ema_components = ("energy",)
    start_name = "init"  # results name the chain starts alone "init"
    protocols = ("buffer", "fresh")

    @staticmethod
    def num_classes(cfg: Config) -> int:
        """Logits of the energy net besides its energy (M-JEM's classifier head); 0 for a plain energy."""
        return 0

    def __init__(self, cfg, states, device, location, step, protocol=None):
        super().__init__(cfg, states, device, location, step)
        self.section = getattr(cfg, self.stage)
        self.init = ChainInit.from_state_dict(sample_shape(cfg), states["chain_init"], self.section.p0_clamp)
        self.energy = build_energy(cfg, self.num_classes(cfg), self.section.multiscale).to(device).eval()
        self.energy.load_state_dict(states["energy"])
        self.protocol = protocol or self.section.eval_protocol
        if self.protocol not in self.protocols:
            raise ValueError(f"unknown sampling protocol {self.protocol!r}; choose one of {', '.join(self.protocols)}")
        if self.protocol == "buffer":  # the samples are the chains themselves: no weights are involved
            self.uses_weights = False
            self._load_buffer(snapshot_location(location, step))

    def describe(self) -> str:
        if self.protocol == "buffer":
            return "the replay buffer's chains at this checkpoint"
        steps = self.section.sample_steps or self.section.langevin.steps
        return f"{steps} SGLD steps from {self.section.chain_init}"

    def _load_buffer(self, location: str) -> None:
        if not storage.exists(location):
            raise FileNotFoundError(
                f"no replay buffer snapshot at {location} for this {self.stage} checkpoint (sample with the fresh "
                "protocol instead: --protocol fresh)"
            )
        store, _ = SlotStore.load(location)
        self.buffer = torch.from_numpy(store.arrays["x"][store.written_step >= 0])
        self.max_samples = len(self.buffer)
        # A fixed order over the slots: consecutive seeds read consecutive, distinct slots.
        self.buffer_order = torch.randperm(len(self.buffer), generator=torch.Generator().manual_seed(self.cfg.run.seed))

    def sample_with_start(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if self.protocol == "buffer":  # the chains as training left them; starts: p0 draws of the same count
            slots = self.buffer_order[(torch.arange(n) + seed) % len(self.buffer)]
            x0 = self.init.sample(n, generator=gen, device=self.device)
            return self.buffer[slots].to(self.device).clamp(-1, 1), x0.clamp(-1, 1)
        x0, x = sample_replay_ebm(self.energy, self.init, self.section, n, gen, self.device)
        return x.clamp(-1, 1), x0.clamp(-1, 1)


class ReplayEBMStage(StageBase):
    """M-EBM; M-JEM and Improved CD override ``num_classes``, ``start_transition``, ``negatives``, ``update``."""

    name = "mebm"
    sampler = ReplayEBMSampler
    reports = frozenset(REPLAY)
    backoff = Backoff(step_sizes=("langevin.step_size",), lrs=("lr",))

    @classmethod
    def networks(cls, cfg: Config):
        s, classes = cls.section(cfg), cls.sampler.num_classes(cfg)  # M-JEM's classifier head, 0 for the others
        return {"energy": (lambda: build_energy(cfg, classes, s.multiscale), True)}

    @classmethod
    def bank_spec(cls, cfg: Config) -> BankSpec:
        """A replay buffer of the section's ``buffer_size`` chain states."""
        s = cls.section(cfg)
        shapes = {"x": sample_shape(cfg)}
        return BankSpec("replay", s.buffer_size, shapes, reinit_prob=s.reinit_prob, write_policy=s.buffer_write)

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        check_stage(cfg, self.name)
        super().__init__(cfg, ctx, init_dir)
        s = self.s
        self.init = ChainInit.for_section(cfg, s)
        self.energy = energy_trainer(
            cfg,
            ctx,
            s,
            s.lr,
            1.0,
            energy_l2=s.energy_l2,
            num_classes=self.num_classes(),
            betas=s.adam_betas,
            multiscale=s.multiscale,
            compute=self.compute,
        )
        self.bank = ctx.bank
        self.batches = self.data_stream(seed_offset=4)

    def num_classes(self) -> int:
        return 0

    def on_start(self, start_step: int) -> None:
        self.bank.pin()
        if self.ctx.is_chief:
            restored = start_step > 0 and (
                restore_snapshot(self, start_step, "buffer", "chains restart from chain_init") is not None
            )
            if not restored and self.s.buffer_prefill:
                self.prefill_buffer()
        barrier()

    @torch.no_grad()
    def prefill_buffer(self, batch: int = 1024) -> None:
        """N fresh chains from chain_init before training (M-EBM / JEM code), each its own lineage."""
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.cfg.run.seed + 19)
        for start in range(0, self.s.buffer_size, batch):
            n = min(batch, self.s.buffer_size - start)
            self.bank.fill(start, 0, x=self.init.sample(n, generator=gen, device=self.ctx.device))

    def before_checkpoint(self, step: int) -> None:
        barrier()  # every rank's push of this step has landed
        if self.ctx.is_chief:
            self.bank.snapshot(step)

    def chain_starts(self, n: int, extra: int = 0):
        """A lease of n buffer chains (the ones the buffer marks for re-initialisation drawn from chain_init),
        the mask, ``extra`` further buffer states (Improved CD's entropy reference) from the same call, and how
        many slots the buffer had filled."""
        drawn = self.bank.sample(n, extra)  # BankRestarted if the actor came back empty meanwhile
        dev = self.ctx.device
        x0 = torch.from_numpy(np.array(drawn["x"])).to(dev)
        reference = torch.from_numpy(np.array(drawn["reference"]["x"])).to(dev) if extra else x0[:0]
        mask = np.asarray(drawn["reinit"], dtype=bool)  # decided on the host: no device read-back
        reinit = torch.from_numpy(mask.copy()).to(dev)
        if mask.any():
            x0[reinit] = self.init.sample(int(mask.sum()), device=dev)
        return drawn["lease"], x0, reinit, reference, drawn["filled"]

    def start_transition(self, x0: torch.Tensor, reinit: torch.Tensor) -> torch.Tensor:
        """The chain starts before SGLD (``reinit``: the ones drawn fresh from chain_init)."""
        return x0

    def negatives(self, x0: torch.Tensor, reference: torch.Tensor, filled: int, stats: StepStats):
        """x⁻ after K SGLD steps, and what ``update`` needs besides (Improved CD: the graph-carrying last step);
        ``filled``: how many slots the buffer held when the chains were drawn."""
        return sgld_chain(self.energy.fast, x0, self.s.langevin, stats), None

    def update(self, x_pos, y_pos, x_neg, extra) -> dict[str, float]:
        return self.energy.update(x_pos, x_neg)

    def entropy_reference_size(self) -> int:
        return 0

    def train_step(self, step: int) -> dict[str, float]:
        x_pos, y_pos = next(self.batches)
        lease, x0, reinit, reference, filled = self.chain_starts(len(x_pos), self.entropy_reference_size())
        x0 = self.start_transition(x0, reinit)
        stats = StepStats()
        x_neg, extra = self.negatives(x0, reference, filled, stats)
        metrics = self.update(x_pos, y_pos, x_neg, extra)
        pushed = self.bank.push(lease, step + 1, x=x_neg)
        metrics.update(
            {
                "Bank/reinit_fraction": reinit.float().mean(),
                "Bank/commit_ok": float(pushed),
                "Langevin/chain_move": (x_neg - x0).flatten(1).norm(dim=1).mean(),
                **{f"Langevin/{k}": v for k, v in stats.means().items()},
            }
        )
        return metrics

    def sample(self, n: int, generator: torch.Generator | None = None, use_ema: bool = False):
        net = self.energy.sampling_net(use_ema)
        return sample_replay_ebm(net, self.init, self.s, n, generator, self.ctx.device)

    def tick_metrics(self, step: int) -> dict[str, float]:
        metrics = toy2d_tick_metrics(self.cfg, self.ctx, lambda n: self.sample(n)[1])
        if self.ctx.is_chief:  # the buffer's own counters: fill, slot age, persistent lineages, refused pushes
            stats = self.bank.stats()
            metrics.update({f"Bank/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
        return metrics

    def tick_images(self, step: int) -> dict[str, torch.Tensor]:
        return fixed_sample_grids(self.cfg, self.ctx, self.sample, "Samples/init")

    def state_dict(self) -> dict[str, dict]:
        return {**self.energy.state_dict(), "chain_init": self.init.state_dict()}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        self.energy.load_state_dict(states)
        self.init = ChainInit.from_state_dict(sample_shape(self.cfg), states["chain_init"], self.s.p0_clamp)
