"""Stage "mjem": M-JEM (Yang & Ji, §4; docs/algorithms.md §8), M-EBM on a classifier with a separate energy head.

Two mini-batches per step, as in the paper: the plain batch x⁺ for the maximum-likelihood (CD) term on the energy
head, and a second, augmented labelled batch (``mjem.classifier_batch_size``, crop + flip by default) for the
cross-entropy of the classifier head. Both heads share the trunk, and both losses come from one forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..contracts import WorkerContext
from ..core.energy_trainer import ExtraTerm
from ..data.augment import AugmentOptions, augment
from ..data.datasets import build_dataset, random_items, toy2d_centres
from .base import data_stream
from .replay_ebm import ReplayEBMSampler, ReplayEBMStage
from .reported import REPLAY

CLASSES = {"digits": 10, "cifar10": 10}
ACCURACY_SAMPLES = 1000


def num_classes(cfg: Config) -> int:
    """``mjem.num_classes``, or the dataset's own count when it is 0."""
    if cfg.mjem.num_classes:
        return cfg.mjem.num_classes
    if cfg.data.dataset == "toy2d":
        return len(toy2d_centres(cfg.data.toy2d_mixture))
    if cfg.data.dataset in CLASSES:
        return CLASSES[cfg.data.dataset]
    raise ConfigError(f"config key 'mjem.num_classes' must be set for data.dataset = {cfg.data.dataset!r}")


def accuracy_set(cfg: Config, n: int = ACCURACY_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fixed, un-augmented dataset images and their labels, for measuring the classifier head."""
    return random_items(build_dataset(cfg), n, seed=cfg.run.seed + 77)


@torch.no_grad()
def classifier_accuracy(net, cfg: Config, n: int = ACCURACY_SAMPLES, device="cpu", items=None) -> float:
    """Top-1 accuracy of M-JEM's classifier head on ``accuracy_set`` (or the given (images, labels))."""
    images, labels = items if items is not None else accuracy_set(cfg, n)
    images, labels = images.to(device), labels.to(device)
    correct = 0
    for i in range(0, len(images), 256):
        _, logits = net(images[i : i + 256], with_logits=True)
        correct += (logits.argmax(1) == labels[i : i + 256]).sum().item()
    return correct / len(images)


class MJEMSampler(ReplayEBMSampler):
    """M-JEM's samples: M-EBM's protocols on the energy head of its classifier network."""

    stage = "mjem"

    @staticmethod
    def num_classes(cfg: Config) -> int:
        return num_classes(cfg)


class MJEMStage(ReplayEBMStage):
    name = "mjem"
    sampler = MJEMSampler
    data_streams = ("train", "labelled")  # the EBM's batches and the classifier's, drawn independently
    reports = frozenset(REPLAY | {"Classifier/accuracy", "Classifier/train_accuracy", "Loss/classifier"})

    def __init__(self, cfg: Config, ctx: WorkerContext, init_dir=None):
        super().__init__(cfg, ctx, init_dir)
        self.labelled = data_stream(cfg, ctx, self.s.classifier_batch_size, seed_offset=5, name="labelled")
        self.accuracy_items = None  # loaded on rank 0's first tick, then kept (not re-read every tick)

    def num_classes(self) -> int:
        classes = num_classes(self.cfg)
        labels = build_dataset(self.cfg)[0][1]
        if not 0 <= int(labels) < classes:
            raise ConfigError(
                f"M-JEM needs labels in [0, {classes}); data.dataset {self.cfg.data.dataset!r} has {labels}"
            )
        return classes

    def update(self, x_pos, y_pos, x_neg, extra) -> dict[str, float]:
        x_cls, y_cls = next(self.labelled)
        x_cls = augment(x_cls, self.s.augment, AugmentOptions.of(self.s))
        y_cls, weight = y_cls.long(), self.s.classifier_weight

        def cross_entropy(logits):
            xent = F.cross_entropy(logits, y_cls)
            accuracy = (logits.argmax(1) == y_cls).float().mean()
            return weight * xent, {"Loss/classifier": xent.detach(), "Classifier/train_accuracy": accuracy}

        # the labelled batch joins the energy's forward: both heads share the trunk, and DDP allows one forward
        return self.energy.update(x_pos, x_neg, ExtraTerm(cross_entropy, inputs=x_cls))

    def tick_metrics(self, step: int) -> dict[str, float]:
        metrics = super().tick_metrics(step)
        if self.ctx.is_chief:
            if self.accuracy_items is None:
                self.accuracy_items = accuracy_set(self.cfg)
            metrics["Classifier/accuracy"] = classifier_accuracy(
                self.energy.net, self.cfg, device=self.ctx.device, items=self.accuracy_items
            )
        return metrics
