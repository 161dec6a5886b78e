"""Stage "icd": Improved Contrastive Divergence (Du et al., Algorithm 1; docs/algorithms.md §8).

On top of the shared replay-buffer loop: chain starts pass through an augmentation transition (colour, flip,
rescale, blur), the buffer resets 0.1% of the chains to U[-1, 1] noise, and the loss is L_CD + L_KL. For L_KL the
last of the K Langevin steps is recomputed for ``icd.kl_samples`` chains with the graph to θ
(``langevin_step_with_graph``); the result x̂⁻ is scored by the energy with its parameters detached (a frozen copy
that shares memory: gradients reach θ only through the sampler), minus the nearest-neighbour entropy of x̂⁻
against ``icd.entropy_reference`` past buffer samples (from the same buffer call as the chain starts). The
multi-scale energy is ``icd.multiscale`` (on by default); evaluation uses the EMA weights (``--ema``).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..core.energy_trainer import ExtraTerm
from ..core.langevin import StepStats, langevin_step_with_graph
from ..core.losses import kl_loss
from ..data.augment import AugmentOptions, augment
from .replay_ebm import DATA_RANGE, ReplayEBMSampler, ReplayEBMStage, sgld_chain
from .reported import REPLAY


def detached(net: torch.nn.Module):
    """E with θ treated as a constant: the "frozen copy" of L_KL without copying the weights."""

    def energy(x: torch.Tensor) -> torch.Tensor:
        params = {k: v.detach() for k, v in net.named_parameters()}
        return functional_call(net, {**params, **dict(net.named_buffers())}, (x,))

    return energy


class ICDSampler(ReplayEBMSampler):
    """Improved CD's samples: fresh chains with its augmentation transitions (Algorithm 2), or its buffer."""

    stage = "icd"


class ICDStage(ReplayEBMStage):
    name = "icd"
    sampler = ICDSampler
    reports = frozenset(REPLAY | {"Loss/kl", "Loss/nn_entropy"})

    def entropy_reference_size(self) -> int:
        return self.s.entropy_reference if self.s.kl_weight else 0

    def start_transition(self, x0: torch.Tensor, reinit: torch.Tensor) -> torch.Tensor:
        """The augmentation transition on the chains drawn from the buffer; fresh noise stays as drawn (its code
        augments in the buffer's sampler only)."""
        if not self.s.augment:
            return x0
        augmented = augment(x0, self.s.augment, AugmentOptions.of(self.s))
        return torch.where(reinit.reshape(-1, *([1] * (x0.dim() - 1))), x0, augmented)

    def negatives(self, x0, reference, filled: int, stats: StepStats):
        # The graph-carrying last step runs eager: compiled graphs have no double backward.
        s, net, fast = self.s, self.energy.net, self.energy.fast
        if not s.kl_weight:
            return super().negatives(x0, reference, filled, stats)
        x_prev = sgld_chain(fast, x0, s.langevin, stats, steps=s.langevin.steps - 1)
        m = min(s.kl_samples, len(x0))
        x_hat = langevin_step_with_graph(net, x_prev[:m], s.langevin.step_size, s.langevin.noise_std)
        if s.langevin.clamp:
            x_hat = x_hat.clamp(*DATA_RANGE)
        rest = sgld_chain(fast, x_prev[m:], s.langevin, stats, steps=1) if m < len(x0) else x_prev[m:]
        # The NN entropy needs a buffer that holds more than the first steps' chains (the paper waits for 1000).
        use_entropy = filled >= s.entropy_min_filled and len(reference) > 0
        return torch.cat([x_hat.detach(), rest]), (x_hat, reference if use_entropy else None)

    def update(self, x_pos, y_pos, x_neg, extra) -> dict[str, float]:
        if extra is None:
            return self.energy.update(x_pos, x_neg)
        x_hat, reference = extra
        s = self.s

        def kl_term(_):
            loss, entropy = kl_loss(detached(self.energy.net), x_hat, reference, s.entropy_weight)
            metrics = {"Loss/kl": loss.detach()}
            if entropy is not None:  # reported from the step the buffer holds enough to measure against
                metrics["Loss/nn_entropy"] = entropy.detach()
            return s.kl_weight * loss, metrics

        return self.energy.update(x_pos, x_neg, ExtraTerm(kl_term))
