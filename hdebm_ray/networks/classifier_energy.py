"""M-JEM's network (Yang & Ji, Fig. 2a): one trunk, a softmax classifier head and a separate energy head.

The trunk is the project's energy net without its own output layer (the SN-GAN ResNet for images, the MLP for
toy2d). The energy E(x) comes from the extra linear energy head, which the L2 regulariser acts on, rather than
from the classifier's LogSumExp as in JEM. ``forward(x)`` is the energy alone, so every sampler treats it like any
other energy net; ``forward(x, with_logits=True)`` gives (energy, logits) from one trunk pass, so the DDP update
runs a single forward for both losses.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierEnergy(nn.Module):
    def __init__(self, trunk: nn.Module, num_classes: int):
        super().__init__()
        if not hasattr(trunk, "features"):
            raise ValueError(f"{type(trunk).__name__} has no features(); M-JEM needs a single-scale trunk")
        self.trunk = trunk
        # The trunk's own output layer would get no gradient (DDP refuses unused parameters): drop it.
        del trunk.head
        self.energy_head = nn.Linear(trunk.feature_dim, 1)
        self.classifier = nn.Linear(trunk.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, with_logits: bool = False):
        h = self.trunk.features(x)
        energy = self.energy_head(h).squeeze(1)
        return (energy, self.classifier(h)) if with_logits else energy
