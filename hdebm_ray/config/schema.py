"""The config schema: one frozen dataclass per section, each field with its allowed range and a one-line doc.

``knob`` attaches the range (``lo``/``hi``, ``lo_open``) or the ``choices`` and the doc to a field; ``config.py``
builds, checks and resolves configs against these declarations, and ``config_show.py`` lists them
(``hdebm-ray config show``, docs/config.md). The EBM stages' shared optimiser and trainer keys are declared once,
in ``EnergyOptimSection``; a section whose default differs redeclares the field with ``like`` (same range and doc).
The baselines' sections (M-EBM, M-JEM, Improved CD) are declared in ``config_baselines.py`` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def knob(default, *, lo=None, hi=None, lo_open=False, choices=None, doc=""):
    """A config field with its allowed range: ``lo``/``hi`` inclusive unless ``lo_open``."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc}
    return field(default=default, metadata=meta)


def like(base, name: str, default, doc: str | None = None):
    """``base``'s field ``name`` with another default (and, if given, doc): the range is declared once."""
    meta = dict(base.__dataclass_fields__[name].metadata)
    if doc is not None:
        meta["doc"] = doc
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class DataSection:
    """The training data: samples in [-1, 1], images of resolution x resolution pixels or toy2d points."""

    dataset: str = knob(
        "digits",
        choices=("digits", "toy2d", "cifar10", "image_folder", "parquet"),
        doc="scikit-learn's digits (offline), 2-D toy mixtures, CIFAR-10, or data.path's images / shards",
    )
    path: str = knob(
        "",
        doc="root folder (cifar10, image_folder) or folder of .parquet shards; a local path or a "
        "URI (s3://, gs://, file://) for image_folder and parquet",
    )
    resolution: int = knob(16, lo=8, hi=1024, doc="image side in pixels (power of two)")
    channels: int = knob(1, choices=(1, 3), doc="1 = greyscale, 3 = RGB (images are converted)")
    download: bool = knob(True, doc="cifar10: let torchvision download into data.path")
    toy2d_mixture: str = knob(
        "grid", choices=("grid", "ring"), doc="toy2d modes: a 5x5 grid on [-0.8, 0.8]^2 or a ring of 8 at radius 0.8"
    )
    toy2d_std: float = knob(0.04, lo=0.0, lo_open=True, doc="std of each toy2d mixture component")
    toy2d_num_samples: int = knob(20000, lo=100, doc="points in the toy2d training set (drawn once from run.seed)")
    num_loader_workers: int = knob(0, lo=0, doc="DataLoader processes per Ray worker (the torch loader)")
    verify: str = knob(
        "first",
        choices=("first", "all"),
        doc="before a run starts, decode the first image, or every file / row once (a progress bar; names a bad one)",
    )
    on_bad_image: str = knob(
        "fail",
        choices=("fail", "skip"),
        doc="an image whose bytes do not decode, during training: fail (stop, naming the file) or skip it (a line "
        "naming the file; with Ray Data, Data/skipped_images counts rank 0's); a file that cannot be read at all "
        "always fails",
    )
    loader: str = knob(
        "auto",
        choices=("auto", "torch", "ray_data"),
        doc="ray_data: stream image_folder / parquet through Ray Data into the Train workers (a fresh file order "
        "and a local shuffle buffer every epoch); torch: a DataLoader in each worker, over the files, or over one "
        "decoded copy in memory where it fits data.in_memory_mb; auto: torch where the decoded images fit "
        "data.in_memory_mb (and for the datasets a package ships), else ray_data",
    )
    in_memory_mb: int = knob(
        512,
        lo=0,
        doc="image_folder / parquet whose images, decoded as uint8 at data.resolution, take at most this many MB are "
        "decoded once into each worker's memory (no per-epoch Ray Data start-up or file reads); 0 = never",
    )
    preprocess_cpus: float = knob(
        1.0,
        lo=0.0,
        lo_open=True,
        doc="ray_data: CPUs the read and decode tasks of a stage's streams may hold at once, besides the Train "
        "workers' and eval actors' (an embedded local Ray counts them in its logical CPUs)",
    )
    preprocess_object_store_mb: int = knob(
        512, lo=16, doc="ray_data: decoded blocks in flight (MB of Ray's object store, a stage's streams together)"
    )
    shuffle_buffer: int = knob(1024, lo=0, doc="ray_data: rows in each worker's local shuffle buffer (0 = none)")
    prefetch_batches: int = knob(2, lo=0, doc="ray_data: batches each worker fetches ahead of its step")


@dataclass(frozen=True)
class UNetSection:
    """The diffusion denoiser D (and a UNet-bodied G1): Improved DDPM's UNet, ADM's with its two options."""

    channels: int = knob(32, lo=8, doc="base width C; level l has C * channel_mult[l] channels")
    channel_mult: tuple[int, ...] = knob((1, 2, 2), lo=1, doc="width multiplier per resolution level")
    num_res_blocks: int = knob(1, lo=1, doc="residual blocks per level (the decoder has one more)")
    attn_resolutions: tuple[int, ...] = knob((8,), lo=1, doc="resolutions (px) with self-attention")
    num_heads: int = knob(4, lo=1, doc="attention heads, unless num_head_channels > 0")
    num_head_channels: int = knob(0, lo=0, doc="channels per attention head (ADM: 64); 0 = use num_heads")
    resblock_updown: bool = knob(False, doc="resample inside residual blocks (ADM / BigGAN) instead of conv layers")
    dropout: float = knob(0.0, lo=0.0, hi=0.9, doc="dropout in the residual blocks (training only)")


@dataclass(frozen=True)
class EnergySection:
    """The energy network H (E of the baselines): SN-GAN ResNet on images, an MLP on toy2d."""

    width: int = knob(64, lo=4, doc="channels of the SN-GAN ResNet energy net (hidden units for MLPs)")
    multiscale: bool = knob(False, doc="sum of energies at full, half and quarter resolution")
    fourier_features: int = knob(0, lo=0, doc="toy2d MLPs: random Fourier input features (0 = raw coordinates)")
    fourier_scale: float = knob(1.0, lo=0.0, lo_open=True, doc="std of the Fourier frequencies (cycles per unit)")


@dataclass(frozen=True)
class GeneratorSection:
    """HDEBM's generator G1, mapping z1 to the image that the denoiser G2 then re-imagines."""

    kind: str = knob(
        "resnet",
        choices=("resnet", "unet"),
        doc="G1: the SN-GAN generator (CIFAR-10), or the diffusion model's UNet body on an image-shaped z1 "
        "(HDEBM's 64/128 px G1; network.unet sets its structure)",
    )
    z_dim: int = knob(64, lo=1, doc="length of z1 for kind resnet (kind unet: z1 has the image's shape)")
    width: int = knob(64, lo=4, doc="SN-GAN generator: channels at 4x4 (halved per block above 32 px); MLP units")
    out_scale: float = knob(2.0, lo=0.0, lo_open=True, doc="tanh output is multiplied by this (Hat EBM: 2)")


@dataclass(frozen=True)
class MLPSection:
    """The toy2d networks (data.dataset = toy2d): MLPs in place of the image networks."""

    hidden: int = knob(128, lo=4, doc="hidden units of the toy2d MLP denoiser")
    depth: int = knob(3, lo=1, doc="hidden layers of every toy2d MLP (denoiser, energy and generator)")
    precondition: bool = knob(True, doc="EDM-style skip/scale around the MLP denoiser (still predicts x0)")


@dataclass(frozen=True)
class NetworkSection:
    """The networks' structure, shared by every stage that builds them."""

    unet: UNetSection = UNetSection()
    energy: EnergySection = EnergySection()
    generator: GeneratorSection = GeneratorSection()
    mlp: MLPSection = MLPSection()


@dataclass(frozen=True)
class DiffusionSection:
    """Stage "diffusion": the truncated, x0-predicting diffusion model D on a cosine schedule."""

    T: int = knob(1000, lo=2, doc="diffusion length of the cosine schedule (timesteps)")
    T_trunc: int = knob(256, lo=1, doc="truncation time T' (< T); training draws t from {1..T'}")
    cosine_s: float = knob(0.008, lo=0.0, doc="offset s of the cosine schedule (Improved DDPM: 0.008)")
    steps: int = knob(2000, lo=1, doc="training steps (optimiser updates) of D")
    batch_size: int = knob(64, lo=1, doc="global batch, split evenly over Ray workers")
    lr: float = knob(2e-4, lo=0.0, lo_open=True, doc="Adam learning rate of D")
    lr_schedule: str = knob("constant", choices=("constant", "cosine"), doc="cosine decays the LR to 0 at `steps`")
    loss_weighting: str = knob(
        "sqrt_snr", choices=("sqrt_snr", "edm"), doc="sqrt_snr = exp(lambda/2) (paper); edm for preconditioned MLPs"
    )
    warmup_steps: int = knob(0, lo=0, doc="steps of linear LR warm-up from 0")
    grad_clip: float = knob(0.0, lo=0.0, doc="layer-wise max grad norm; 0 = off")
    report_every: int = knob(100, lo=1, doc="steps between ray.train.report ticks")
    checkpoint_every: int = knob(500, lo=1, doc="steps between checkpoints (multiple of report_every)")


@dataclass(frozen=True)
class DistillSection:
    """Stage "distill": progressive distillation of D's N0-step DDIM sampler down to one step (G2)."""

    n0_steps: int = knob(16, lo=1, doc="N0: DDIM steps of the first teacher (power of two dividing T')")
    steps_per_stage: int = knob(300, lo=1, doc="training steps per halving; the stage runs log2(N0) halvings")
    batch_size: int = knob(64, lo=1, doc="global batch, split evenly over Ray workers")
    lr: float = knob(5e-5, lo=0.0, lo_open=True, doc="Adam learning rate of each student (constant)")
    grad_clip: float = knob(0.0, lo=0.0, doc="layer-wise max grad norm; 0 = off")
    report_every: int = knob(100, lo=1, doc="steps between ray.train.report ticks")
    checkpoint_every: int = knob(300, lo=1, doc="steps between checkpoints (multiple of report_every)")
    eval_batch: int = knob(256, lo=1, doc="images per rank to measure student-vs-teacher MSE after each halving")
    student_dropout: float = knob(
        0.0, lo=0.0, hi=0.9, doc="dropout of the students (Salimans & Ho's code: 0; the teacher keeps unet.dropout)"
    )


@dataclass(frozen=True)
class EnergyOptimSection:
    """What every EBM stage (stage1, stage2, mebm, mjem, icd) shares: its length, batch, report cadence and the
    trainer of its energy net (LR schedule, clipping, data jitter, MAD filter, EMA). Stage 1 applies the schedule,
    clipping and EMA to G1 as well."""

    steps: int = knob(600, lo=1, doc="training steps (optimiser updates) of the stage")
    batch_size: int = knob(64, lo=1, doc="global batch of data images, split evenly over Ray workers")
    lr_schedule: str = knob(
        "constant", choices=("constant", "cosine"), doc="cosine: decay to 0 at `steps` after warm-up"
    )
    warmup_steps: int = knob(0, lo=0, doc="steps of linear LR warm-up from 0")
    grad_clip: float = knob(50.0, lo=0.0, doc="layer-wise max grad norm (each parameter tensor's L2 norm); 0 = off")
    data_jitter: float = knob(1e-3, lo=0.0, doc="std of Gaussian noise added to the data x+ ([-1, 1] units); 0 = off")
    mad_filter: bool = knob(False, doc="drop data with energy < median - mad_k * MAD of the global batch (ImageNet)")
    mad_k: float = knob(6.0, lo=0.0, lo_open=True, doc="k of the MAD filter, in MADs below the median energy")
    ema_halflife_kimg: float = knob(10.0, lo=0.0, doc="EMA half-life in kimg (thousands of images); 0 = no EMA")
    report_every: int = knob(50, lo=1, doc="steps between ray.train.report ticks")
    checkpoint_every: int = knob(200, lo=1, doc="steps between checkpoints (multiple of report_every)")


@dataclass(frozen=True)
class LangevinSection:
    """Stage 1's Langevin chain on the residual Y (Hill's convention: drift eps^2 / (2 T) * grad H, noise eps)."""

    steps: int = knob(20, lo=1, doc="K: Langevin steps on Y per chain")
    step_size: float = knob(5e-4, lo=0.0, lo_open=True, doc="epsilon: drift eps^2/2 * grad U, noise eps")
    temperature: float = knob(1e-8, lo=0.0, lo_open=True, doc="T_mc: U = H / T_mc")
    drift_clip: float = knob(2.5, lo=0.0, doc="per-sample L2 bound on the drift; 0 = off")


@dataclass(frozen=True)
class Stage1Section(EnergyOptimSection):
    """Stage "stage1" (HDEBM Algorithm 1): H and G1, Langevin on Y, G1 regressed onto the shared bank."""

    langevin: LangevinSection = LangevinSection()
    bank_size: int = knob(2048, lo=1, doc="N entries (z1, z2, X-) in the shared bank")
    beta1: float = knob(1.0, lo=0.0, doc="G1's loss: weight of ||G2(G1(z1), z2) - X-||^2")
    beta2: float = knob(0.1, lo=0.0, doc="G1's loss: weight of ||G1(z1) - X-||^2")
    gen_loss_scale: float = knob(1000.0, lo=0.0, lo_open=True, doc="Hat EBM multiplies the pixel MSE by 1000")
    lr_energy: float = knob(1e-4, lo=0.0, lo_open=True, doc="Adam learning rate of H")
    lr_generator: float = knob(1e-4, lo=0.0, lo_open=True, doc="Adam learning rate of G1")


@dataclass(frozen=True)
class JointLangevinSection:
    """Stage 2's joint Langevin chain on (Y, z1, z2): K steps on Y, the latents a step every few Y-steps (Hill's
    convention on U = H / T_mc, as Stage 1's chain)."""

    steps: int = knob(20, lo=1, doc="K: Y-steps of the joint chain")
    y_step_size: float = knob(5e-4, lo=0.0, lo_open=True, doc="epsilon1: Langevin step size on Y")
    z1_step_size: float = knob(5e-5, lo=0.0, lo_open=True, doc="epsilon2: Langevin step size on z1")
    z2_step_size: float = knob(1e-3, lo=0.0, lo_open=True, doc="epsilon3: Langevin step size on z2")
    y_steps_per_latent_step: int = knob(5, lo=1, doc="the latents take a step every this many Y-steps")
    latent_prior: bool = knob(False, doc="add the N(0, I) prior gradient to the latent steps")
    temperature: float = knob(1e-8, lo=0.0, lo_open=True, doc="T_mc: U = H / T_mc")
    drift_clip: float = knob(2.5, lo=0.0, doc="per-sample L2 bound on Y's drift (not the latents'); 0 = off")


@dataclass(frozen=True)
class Stage2Section(EnergyOptimSection):
    """Stage "stage2" (HDEBM Algorithm 2): H alone, joint Langevin on (Y, z1, z2) with G frozen."""

    steps: int = like(EnergyOptimSection, "steps", 300)
    langevin: JointLangevinSection = JointLangevinSection()
    lr: float = knob(2e-5, lo=0.0, lo_open=True, doc="Adam learning rate of H (from Stage 1's H)")
    start_from_ema: bool = knob(
        True, doc="start from Stage 1's EMA of H and G1 (what its samples use) if it kept one; false: raw weights"
    )
    follow_stage1_step_size: bool = knob(
        True,
        doc="multiply the chain's three step sizes by the Stage 1 checkpoint's stage1.langevin.step_size over this "
        "config's (a guard back-off, a sweep's or PBT's choice): H learned its short-run chain at that epsilon",
    )
    checkpoint_every: int = like(EnergyOptimSection, "checkpoint_every", 100)


# The stages, each with its section of Config under its own name (the stage registry holds the same names: a test
# keeps them equal); cross-key checks iterate over these.
STAGE_NAMES = ("diffusion", "distill", "stage1", "stage2", "mebm", "mjem", "icd")
