"""The config sections of the baselines, M-EBM, M-JEM and Improved CD: their SGLD chains, replay buffer and CD
update on the EBM optimiser keys every EBM stage shares (``config_schema.EnergyOptimSection``), declared with
``knob`` / ``like`` as the rest of the schema."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import EnergyOptimSection, knob, like


@dataclass(frozen=True)
class SGLDSection:
    """A baseline's SGLD chain: x <- x - alpha * grad E(x) + sigma * xi."""

    steps: int = knob(10, lo=1, doc="K: SGLD steps per training chain")
    step_size: float = knob(1.0, lo=0.0, lo_open=True, doc="alpha: drift alpha * grad E")
    noise_std: float = knob(0.001, lo=0.0, doc="sigma: std of the noise per step (pixel units)")
    drift_clip: float = knob(0.0, lo=0.0, doc="per-sample L2 bound on the drift; 0 = off")
    clamp: bool = knob(False, doc="clamp the chains to the data range [-1, 1] after every step (M-EBM, Improved CD)")
    grad_clamp: float = knob(
        0.0, lo=0.0, doc="clamp each element of grad E to [-grad_clamp, grad_clamp] before the step; 0 = off (M-EBM: 1)"
    )


IMAGE_AUGMENTS = ("color", "flip", "crop", "rescale", "blur")
VECTOR_AUGMENTS = ("jitter",)  # toy2d points
AUGMENTS = IMAGE_AUGMENTS + VECTOR_AUGMENTS


@dataclass(frozen=True)
class ReplayEBMSection(EnergyOptimSection):
    """What M-EBM, M-JEM and Improved CD share: SGLD chains kept in a replay buffer, the CD update."""

    steps: int = like(EnergyOptimSection, "steps", 2000)
    # M-EBM's code clamps every gradient element to [-1, 1] and the chains to [-1, 1].
    langevin: SGLDSection = SGLDSection(grad_clamp=1.0, clamp=True)
    chain_init: str = knob("p0", choices=("p0", "uniform"), doc="p0 = N(mu, Sigma) of the data, or U[-1, 1]")
    buffer_write: str = knob(
        "in_place",
        choices=("in_place", "reservoir", "fifo", "random"),
        doc="where chain ends go: back into the slots they came from (M-EBM/JEM code: N persistent chains), a "
        "reservoir sample of all ends (Improved CD code), a ring over the oldest, or random slots",
    )
    buffer_prefill: bool = knob(True, doc="fill the buffer with buffer_size draws from chain_init before training")
    eval_protocol: str = knob(
        "buffer",
        choices=("buffer", "fresh"),
        doc="what FID scores: the replay buffer's persistent chains at the checkpoint (M-EBM's reported FID), or "
        "fresh chains of sample_steps from chain_init",
    )
    sample_steps: int = knob(0, lo=0, doc="SGLD steps when sampling a checkpoint; 0 = langevin.steps (K)")
    sample_augment_every: int = knob(0, lo=0, doc="sampling: augment every this many SGLD steps; 0 = never")
    augment: tuple[str, ...] = knob(
        (), choices=AUGMENTS, doc="augmentations of the sampling transitions (images: color flip crop rescale blur)"
    )
    augment_jitter_std: float = knob(0.05, lo=0.0, doc="std of the 'jitter' augmentation (toy2d vectors)")
    multiscale: bool = knob(False, doc="this stage's energy sums full, half and quarter resolution (images)")
    buffer_size: int = knob(10000, lo=1, doc="chains (slots) in the replay buffer")
    reinit_prob: float = knob(0.05, lo=0.0, hi=1.0, doc="rho: chains started from chain_init instead of the buffer")
    energy_l2: float = knob(0.1, lo=0.0, doc="alpha_reg: weight of E(x+)^2 + E(x-)^2")
    p0_max_full_dim: int = knob(4096, lo=1, doc="full covariance up to this many dimensions, low rank above")
    p0_rank: int = knob(512, lo=1, doc="principal directions of the low-rank p0")
    p0_cov_jitter: float = knob(1e-4, lo=0.0, doc="added to p0's covariance diagonal (M-EBM's code: 1e-4)")
    p0_clamp: bool = knob(True, doc="clamp p0 draws to [-1, 1] (M-EBM's code)")
    augment_crop_area: tuple[float, ...] = knob(
        (0.08, 1.0), lo=0.0, hi=1.0, doc="rescale: area of the random resized crop, a fraction of the image (min, max)"
    )
    augment_crop_ratio: tuple[float, ...] = knob(
        (0.75, 4 / 3), lo=0.0, lo_open=True, doc="rescale: aspect ratio range of the random resized crop"
    )
    augment_color_strength: float = knob(
        0.8, lo=0.0, hi=1.0, doc="color: brightness, contrast and saturation factors drawn from 1 +- this"
    )
    augment_hue: float = knob(0.4, lo=0.0, hi=0.5, doc="color: hue rotation of up to this many turns (RGB only)")
    augment_color_prob: float = knob(0.8, lo=0.0, hi=1.0, doc="color: share of images jittered")
    augment_grayscale_prob: float = knob(0.2, lo=0.0, hi=1.0, doc="color: share of images turned grey afterwards")
    lr: float = knob(1e-4, lo=0.0, lo_open=True, doc="Adam learning rate of E")
    adam_betas: tuple[float, ...] = knob((0.9, 0.999), lo=0.0, hi=0.99999, doc="Adam (beta1, beta2)")
    grad_clip: float = like(EnergyOptimSection, "grad_clip", 0.0)
    data_jitter: float = like(EnergyOptimSection, "data_jitter", 0.0)
    checkpoint_every: int = like(EnergyOptimSection, "checkpoint_every", 500)


@dataclass(frozen=True)
class MEBMSection(ReplayEBMSection):
    """M-EBM (Yang & Ji): SGLD from a replay buffer re-initialised from p0 = N(mu, Sigma) of the data."""


@dataclass(frozen=True)
class MJEMSection(ReplayEBMSection):
    """M-JEM: M-EBM on a classifier's trunk with a separate energy head; cross-entropy on an augmented batch."""

    augment: tuple[str, ...] = like(
        ReplayEBMSection, "augment", ("crop", "flip"), doc="augmentations of the classifier's batch (and of sampling)"
    )
    classifier_batch_size: int = knob(128, lo=1, doc="global batch of the cross-entropy term")
    classifier_weight: float = knob(1.0, lo=0.0, doc="weight of the cross-entropy term in the loss")
    num_classes: int = knob(0, lo=0, doc="0 = from the dataset (digits, cifar10: 10; toy2d: its modes)")


_R = ReplayEBMSection  # short name for the redeclarations below


@dataclass(frozen=True)
class ICDSection(ReplayEBMSection):
    """Improved CD (Du et al.): L_CD + L_KL, augmentation transitions, buffer reset to U[-1, 1] noise.

    Defaults are the paper code's CIFAR-10 values moved from its [0, 1] pixels to our [-1, 1] ones: step 100 on
    [0, 1] is alpha = 400 here, noise 0.001 is sigma = 0.002."""

    langevin: SGLDSection = SGLDSection(steps=40, step_size=400.0, noise_std=0.002, clamp=True)
    chain_init: str = like(_R, "chain_init", "uniform")
    buffer_write: str = like(_R, "buffer_write", "reservoir")
    buffer_prefill: bool = like(_R, "buffer_prefill", False)
    eval_protocol: str = like(_R, "eval_protocol", "fresh")
    multiscale: bool = like(_R, "multiscale", True, doc="energy = sum at full, half and quarter resolution (images)")
    sample_steps: int = like(_R, "sample_steps", 200)
    sample_augment_every: int = like(_R, "sample_augment_every", 20)
    # The code's CIFAR-10 transition: random resized crop, flip, colour jitter + random grayscale (blur: other data).
    augment: tuple[str, ...] = like(
        _R,
        "augment",
        ("rescale", "flip", "color"),
        doc="augmentations of the chains drawn from the buffer and of the sampling transitions",
    )
    reinit_prob: float = like(_R, "reinit_prob", 0.001)
    energy_l2: float = like(_R, "energy_l2", 1.0)
    lr: float = like(_R, "lr", 2e-4)
    adam_betas: tuple[float, ...] = like(_R, "adam_betas", (0.0, 0.9))
    kl_weight: float = knob(1.0, lo=0.0, doc="weight of L_KL; 0 = plain CD")
    entropy_weight: float = knob(0.3, lo=0.0, doc="weight of the nearest-neighbour entropy inside L_KL")
    kl_samples: int = knob(128, lo=1, doc="chains per rank whose last step is recomputed with the graph")
    entropy_reference: int = knob(100, lo=1, doc="past buffer samples the NN entropy measures against")
    entropy_min_filled: int = knob(1000, lo=0, doc="the entropy term starts once the buffer holds this many")
