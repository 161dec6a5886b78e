"""The config sections of where and how a run runs rather than what it trains: the run's identity and lease, the
Ray cluster and worker group, precision and kernels, the divergence guard, and evaluation. Declared with ``knob``
as the rest of the schema (``schema.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import STAGE_NAMES, knob


@dataclass(frozen=True)
class RunSection:
    """The run: its name, where it is stored and its seed."""

    name: str = knob("hdebm", doc="run name; re-running with the same name resumes")
    storage_path: str = knob("runs", doc="local dir, NFS mount or s3:// / gs:// URI for checkpoints and logs")
    shared_storage: bool = knob(False, doc="assert that a local storage_path is mounted on every node")
    seed: int = knob(0, lo=0, hi=2**63 - 1, doc="base seed of the weights, data order, toy2d points and chain starts")
    lease_s: float = knob(
        60.0,
        lo=5.0,
        hi=86400.0,
        doc="the driver's lease on its run, renewed every lease_s / 3: a second driver is refused while it is fresh, "
        "and a dead driver's successor takes the run over once it has expired (at once when it was on the same host)",
    )
    interrupt_check_every: int = knob(
        10,
        lo=1,
        hi=100000,
        doc="steps between the ranks' checks for a preemption notice (a node drained with a deadline) or a stop "
        "request (SIGTERM to the driver): each is one barrier; on one, the stage checkpoints at that step",
    )


@dataclass(frozen=True)
class RaySection:
    """The Ray cluster and the Ray Train worker group every stage runs on."""

    address: str = knob("", doc="'' = $RAY_ADDRESS if set, else an embedded local Ray; or 'auto' / ray://...")
    num_workers: int = knob(2, lo=1, doc="Ray Train workers (DDP ranks)")
    use_gpu: bool = knob(False, doc="one GPU per Ray Train worker (nccl); false: CPU workers (gloo)")
    cpus_per_worker: float = knob(1.0, lo=0.0, lo_open=True, doc="logical CPUs each Ray Train worker reserves")
    placement_strategy: str = knob(
        "PACK",
        choices=("PACK", "SPREAD"),
        doc="where the workers go: PACK fills a node first (fast collectives), SPREAD puts each on its own node "
        "where there are enough (a lost node costs fewer ranks); both fall back to whatever fits",
    )
    max_failures: int = knob(
        3,
        lo=-1,
        doc="worker-group restarts per stage after a real failure (a dead worker, a node lost without notice, a "
        "restarted or stuck bank actor); -1 = unlimited. Preemptions have their own budget",
    )
    max_preemption_failures: int = knob(
        -1,
        lo=-1,
        doc="restarts after a node was preempted with notice (drained: spot reclaims on a Ray autoscaler or KubeRay); "
        "-1 = unlimited: each costs at most the steps since the preemption checkpoint",
    )
    preemption_grace_s: float = knob(
        10.0,
        lo=0.0,
        hi=3600.0,
        doc="Ray Train's FailureConfig.preemption_grace_s: after a preemption notice the group (checkpointed at the "
        "current step, holding) is restarted once the node has gone or this long after the notice's deadline",
    )
    elastic_min_workers: int = knob(
        0,
        lo=0,
        doc="elastic worker group: restart with as few as this many workers (up to ray.num_workers) when nodes are "
        "lost, the global batch kept (every batch size must divide by each group size); 0 = a fixed group",
    )
    bank_timeout_s: float = knob(
        300.0,
        lo=1.0,
        hi=86400.0,
        doc="a bank / replay-buffer call that takes longer is treated as a dead actor (restarted; the workers resume "
        "from their checkpoint and its snapshot); a paper run's snapshot of a 5.5 GiB bank to S3 takes about a minute",
    )
    collective_timeout_s: float = knob(
        1800.0,
        lo=10.0,
        hi=86400.0,
        doc="the workers' torch.distributed timeout (Ray's TorchConfig): a rank that waits longer in an all-reduce "
        "or barrier fails the group, which restarts; must cover rank 0's checkpoint and bank snapshot",
    )
    checkpoints_to_keep: int = knob(
        2,
        lo=1,
        doc="checkpoints kept per stage (bank snapshots: one more); with eval actors scoring the stage, a checkpoint "
        "is not removed before it has been scored",
    )
    connect_timeout_s: float = knob(30.0, lo=0.0, lo_open=True, doc="seconds to reach ray.address before failing")


@dataclass(frozen=True)
class ComputeSection:
    """Precision and kernels of every stage's networks (``compute.py``); the GPU presets turn on what helps."""

    precision: str = knob(
        "fp32",
        choices=("fp32", "bf16", "fp16"),
        doc="autocast dtype of every network forward (Langevin chains' state and updates stay fp32); fp16 "
        "needs a GPU, trains with a GradScaler and keeps the chains' input gradients in fp32",
    )
    tf32: bool = knob(True, doc="CUDA: TF32 tensor cores for fp32 matmuls and convolutions")
    channels_last: bool = knob(False, doc="conv weights in NHWC memory format (tensor cores / oneDNN prefer it)")
    compile: str = knob(
        "none",
        choices=("none", "default", "max-autotune"),
        doc="torch.compile mode for H, G1 and the denoiser (forward and backward); none = eager; max-autotune "
        "runs without CUDA graphs (chains keep outputs across graph replays)",
    )
    adam: str = knob(
        "auto",
        choices=("auto", "fused", "foreach", "for_loop"),
        doc="Adam's kernels: auto = fused on CUDA, foreach on CPU",
    )
    cudnn_benchmark: bool = knob(True, doc="CUDA: let cuDNN pick the fastest convolution algorithm per shape")


@dataclass(frozen=True)
class GuardSection:
    """The divergence guard of the EBM stages (stage1, stage2, mebm, mjem, icd): on a non-finite or out-of-bound
    metric, roll back to the last checkpoint and back off (``guard.py``)."""

    enabled: bool = knob(True, doc="check every step of the EBM stages; false: a divergence trains on")
    check_every: int = knob(
        0, lo=0, doc="also read the per-step flags every this many steps (one all-gather); 0 = at report ticks only"
    )
    max_rollbacks: int = knob(3, lo=0, doc="rollbacks per stage before the run stops; 0 = stop at the first")
    backoff: float = knob(0.5, lo=0.0, hi=1.0, lo_open=True, doc="each rollback multiplies the backed-off keys by this")
    backoff_applies_to: str = knob(
        "both", choices=("both", "step_size", "lr"), doc="what a rollback scales: Langevin step sizes, LRs, or both"
    )
    mode: str = knob(
        "rollback",
        choices=("rollback", "observe"),
        doc="rollback: a violation rolls the stage back and backs it off; observe: it is printed and counted in "
        "Guard/observed_violations, and training goes on",
    )
    patience: int = knob(
        3, lo=1, doc="consecutive steps a bound must be exceeded before it counts (non-finite values count at once)"
    )
    max_step_rms: float = knob(
        2.0,
        lo=0.0,
        doc="bound on Langevin/step_rms, a chain step's RMS per element after the drift clip (data units; the data "
        "spans [-1, 1], and a clamped chain's step is capped at that width, 2, so only an unclamped chain crossing "
        "the whole data range in one step trips it); 0 = none",
    )
    max_sample_abs: float = knob(
        100.0, lo=0.0, doc="bound on Langevin/sample_abs_max, the largest |x| of the chain ends (data units); 0 = none"
    )
    max_gap_z: float = knob(
        50.0,
        lo=0.0,
        doc="bound on Energy/gap's distance from its running mean, in running standard deviations (scale-free: a "
        "jump by orders of magnitude, not a drift); 0 = none",
    )
    gap_warmup_steps: int = knob(50, lo=1, doc="steps of each attempt that only learn the gap's running statistics")
    max_clip_fraction: float = knob(
        0.0, lo=0.0, hi=1.0, doc="bound on Langevin/clip_fraction, the share of clipped drifts; 0 = none"
    )
    # scale-dependent: H's scale is free, so a healthy paper run can pass any fixed bound (off by default)
    max_energy_gap: float = knob(0.0, lo=0.0, doc="bound on Energy/abs_gap, |E(x-) - E(x+)| (batch means); 0 = none")
    max_drift_norm: float = knob(
        0.0, lo=0.0, doc="bound on Langevin/drift_norm, a chain's mean per-sample drift before the clip (L2); 0 = none"
    )
    inject_nan_at_step: int = knob(0, lo=0, doc="testing: H outputs NaN in this step (1-based) of the first try")


@dataclass(frozen=True)
class EvalSection:
    """FID / KID of checkpoints: feature space, sample counts and the eval actors that score during training."""

    features: str = knob(
        "inception",
        choices=("inception", "classifier", "torchscript", "raw"),
        doc="FID features: clean-fid InceptionV3, a classifier trained on the labels (not Inception-FID), "
        "a TorchScript file, or the raw samples (toy2d points; pixels only for smoke tests)",
    )
    torchscript_path: str = knob(
        "", doc="eval.features = torchscript: the file (your command's or run config's, never a checkpoint's)"
    )
    inception_path: str = knob(
        "",
        doc="eval.features = inception: clean-fid's InceptionV3 TorchScript file; '' = ~/.cache/hdebm_ray/inception/"
        "inception-2015-12-05.pt (a folder only you can write), downloaded there on first use. Taken from your "
        "command or run config, never from a checkpoint's",
    )
    inception_sha256: str = knob(
        "",
        doc="the weights' expected SHA-256 (64 hex digits), checked before every use; '' = the hash pinned in "
        "<file>.sha256 the first time the file was used (written then, and printed to pin here)",
    )
    num_samples: int = knob(10000, lo=2, doc="generated samples per evaluation (the papers use 50000)")
    ref_samples: int = knob(0, lo=0, doc="dataset images for the reference statistics; 0 = all")
    kid_reference_samples: int = knob(
        10000, lo=2, doc="reference feature vectors kept (a uniform random subset) for KID; FID's moments use them all"
    )
    batch_size: int = knob(256, lo=1, doc="samples per sampler call and images per feature-extraction batch")
    pr_k: int = knob(
        3,
        lo=0,
        doc="k of the k-NN precision / recall (Kynkäänniemi et al. 2019: 3), against as many reference feature "
        "vectors as samples (from the KID subset); 0 = not computed",
    )
    inception_score: bool = knob(
        True, doc="eval.features = inception: also the Inception Score (a second pass of each batch through the net)"
    )
    kid_subsets: int = knob(100, lo=1, doc="random subsets (up to 1000 samples each) averaged for KID")
    actors: int = knob(0, lo=0, doc="eval actors scoring checkpoints while training runs (0 = none)")
    cpus_per_actor: float = knob(1.0, lo=0.0, doc="logical CPUs each eval actor reserves")
    gpus_per_actor: float = knob(0.0, lo=0.0, doc="a GPU share each eval actor reserves beyond the workers'")
    use_ema: tuple[str, ...] = knob(
        ("stage1", "stage2", "icd"),
        choices=STAGE_NAMES,
        doc="stages whose checkpoints are sampled with their EMA weights (Hat EBM and Improved CD evaluate the "
        "EMA; M-EBM / JEM have none); the others with the raw weights",
    )
    stages: tuple[str, ...] = knob(
        ("stage1", "stage2", "mebm", "mjem", "icd"),
        choices=STAGE_NAMES,
        doc="stages whose checkpoints the eval actors score",
    )
    image_grid: int = knob(64, lo=0, doc="samples in the fixed-latent TensorBoard grids at each checkpoint (0 = none)")
    timeout_s: float = knob(
        7200.0,
        lo=1.0,
        doc="an evaluation running longer is cancelled, its actor restarted and the checkpoint tried once more, then "
        "reported as not scored (10K Stage 2 samples at K = 50 take minutes on a GPU)",
    )
    drain_timeout_s: float = knob(
        7200.0, lo=0.0, doc="how long the end of a run waits for the evaluations still queued; 0 = not at all"
    )
