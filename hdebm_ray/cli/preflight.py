"""Every check a run makes before it starts, in one place: ``--dry-run`` runs exactly these and stops, the real run
runs them and goes on. Each failure is one line naming the key, flag, file or value.

- the installed libraries that load files we are handed (torch, Pillow) are at least the versions without open
  advisories (``check_dependencies``);
- the storage path is a folder (or can be made one) and, inside a submitted job, absolute;
- the data are there and the first image decodes (``data.verify: all``: every one);
- each stage's own checks against the data (``config.check_stage``), and the checkpoint it starts from: complete,
  of the stage it needs, its weights the shapes this config's networks have;
- the run's own files (``check_run_state``): no live driver owns it, its run-state files are readable, and the
  checkpoint each stage resumes from holds weights this config's networks can load;
- what the run holds at once fits where it runs: CPUs and GPUs against the machine (an embedded Ray) or the cluster
  (connected to for the check), the bank or replay buffer against the memory of one node, and the networks with
  their optimiser state against one worker's memory.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed

import torch

from ..config import Config, ConfigError, check_stage
from ..data.datasets import check_data_available
from ..io import storage
from ..io.checkpoint import CheckpointError, load_meta, newest_checkpoint, state_files
from ..io.ownership import RunLease, run_id
from ..io.storage import check_not_in_job_working_dir
from ..stages import stage_class
from ..training.guard import GuardLog, take_divergence
from ..training.pipeline import read_state

# The lowest versions without a known advisory on what we do with them: torch.load(weights_only=True) of files we
# are handed (CVE-2025-32434, fixed in 2.6; CVE-2026-24747, fixed in 2.10), Pillow decoding images we are handed
# (PYSEC-2026-2253 .. 2257, fixed in 12.3).
FLOORS = {"torch": ("2.10.0", "weights_only loading below it can run code"), "pillow": ("12.3.0", "image decoding")}


class DependencyError(RuntimeError):
    """An installed library below the version hdebm-ray needs for safety: one line saying which and why."""


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def check_dependencies() -> None:
    for package, (floor, why) in FLOORS.items():
        try:
            have = installed(package)
        except PackageNotFoundError:
            continue  # not installed: whatever imports it fails with its own message
        if _release(have) < _release(floor):
            raise DependencyError(
                f"{package} {have} is installed; hdebm-ray needs {package} >= {floor} ({why}): "
                f"pip install '{package}>={floor}'"
            )


def preflight(
    cfg: Config,
    stages: list[str],
    init_from: dict[str, str | None] | None = None,
    concurrent_runs: int = 1,
    run_location: str | None = None,
) -> None:
    """Every check of a run of ``stages`` (``init_from``: the checkpoint each starts from, where given;
    ``run_location``: the folder the run owns, default the config's run folder)."""
    check_storage_folder(cfg)
    check_not_in_job_working_dir(cfg)
    check_run_state(cfg, stages, run_location or storage.run_dir(cfg))
    check_data_available(cfg)
    for stage in stages:
        check_stage(cfg, stage)
        start = (init_from or {}).get(stage)
        if start is not None:
            check_start(cfg, stage, start)
    check_resources(cfg, stages, concurrent_runs)


def check_run_state(cfg: Config, stages: list[str], location: str) -> None:
    """The run's own files as the real run reads them, unchanged: not owned by a live driver, its identity, the
    pipeline record, each stage's guard log and pending divergence readable, and the checkpoint each stage resumes
    from holding weights this config's networks can load."""
    RunLease(location, cfg.run.lease_s).refuse_if_held()
    run_id(location, create=False)
    read_state(location)
    for stage in stages:
        stage_dir = f"{location}/{stage}"
        GuardLog.read(cfg, stage_dir)
        take_divergence(stage_dir, remove=False)
        if (newest := newest_checkpoint(stage_dir)) is not None:  # unreadable: the run falls back to an older one
            check_weights_fit(newest, cfg, stage_class(stage).networks(cfg), "resumes", skip_unreadable=True)


def check_storage_folder(cfg: Config) -> None:
    """``run.storage_path`` and the run's folder must be folders (or not exist yet), not files."""
    location = storage.run_dir(cfg)
    for path in (location.rsplit("/", 1)[0], location):
        fs, local = storage.fs_and_path(path)
        kind = fs.get_file_info(local).type
        if kind == storage.pafs.FileType.File:
            raise ConfigError(f"config key 'run.storage_path': '{path}' is a file, not a folder for the run's files")


def check_start(cfg: Config, stage: str, start: str) -> None:
    """The checkpoint ``stage`` starts from: complete, of the stage it needs, with weights that fit this config."""
    wanted = stage_class(stage).starts_from
    meta = load_meta(start)
    if wanted is not None and meta.get("stage") != wanted:
        raise CheckpointError(
            f"--init-from '{start}' is a {meta.get('stage')!r} checkpoint; stage {stage!r} starts from a {wanted!r} one"
        )
    if wanted is not None:
        check_weights_fit(start, cfg, stage_class(wanted).networks(cfg), "starts from")


def check_weights_fit(checkpoint: str, cfg: Config, networks: dict, verb: str, skip_unreadable: bool = False) -> None:
    """``CheckpointError`` naming the first parameter whose name or shape differs between the checkpoint's networks
    and the ones ``cfg`` builds (``networks``: its stage's ``networks(cfg)``; on the meta device: nothing allocated;
    the files memory-mapped, not read)."""
    with storage.local_dir(checkpoint) as d:
        files = state_files(d)
        for name, (build, _) in networks.items():
            if name not in files:
                continue
            with torch.device("meta"):
                want = {k: tuple(v.shape) for k, v in build().state_dict().items()}
            try:
                have = {k: tuple(v.shape) for k, v in torch.load(files[name], mmap=True, weights_only=True).items()}
            except Exception as e:  # noqa: BLE001 - truncated, refused by weights_only, not a state_dict
                if skip_unreadable:
                    return
                raise CheckpointError(
                    f"checkpoint '{checkpoint}': its {name}.pt cannot be read ({str(e).splitlines()[0]})"
                ) from None
            missing = [f"has no '{k}'" for k in want if k not in have]
            extra = [f"has '{k}', which this config's network lacks" for k in have if k not in want]
            shapes = [
                f"'{k}' is {list(have[k])}, this config's {list(want[k])}"
                for k in want
                if have.get(k, want[k]) != want[k]
            ]
            problem = (missing + extra + shapes or [None])[0]
            if problem:
                raise CheckpointError(
                    f"the run {verb} checkpoint '{checkpoint}', whose {name}.pt does not fit this config's network.* "
                    f"({problem})"
                )


def machine_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def check_resources(cfg: Config, stages: list[str], concurrent_runs: int = 1) -> None:
    """What the run holds at once against where it runs: on an embedded Ray, this machine (refused); on a cluster,
    the cluster as it is now, connected to here (what no alive node holds is a warning: an autoscaler may add it)."""
    r, e = cfg.ray, cfg.eval
    cores = os.cpu_count() or 1
    cpus = concurrent_runs * (r.num_workers * r.cpus_per_worker + e.actors * e.cpus_per_actor)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    local = address in ("", "local")
    if local:
        # an embedded Ray oversubscribes this machine's cores a little (eval actors beside the workers), not more
        limit = max(4 * cores, cores + 16)
        if cpus > limit:
            raise ConfigError(
                f"the run needs {cpus:g} CPUs at once (ray.num_workers x ray.cpus_per_worker + eval.actors x "
                f"eval.cpus_per_actor) and this machine has {cores}: lower them, or run on a cluster (ray.address)"
            )
        gpus = (r.num_workers if r.use_gpu else 0) + e.actors * e.gpus_per_actor
        if gpus:
            have = torch.cuda.device_count()
            if gpus > have:
                raise ConfigError(
                    f"the run needs {gpus:g} GPUs (ray.use_gpu / eval.gpus_per_actor) and this machine has {have}"
                )
    memory = machine_memory_bytes() if local else 0
    for stage in stages:
        cls = stage_class(stage)
        spec = cls.bank_spec(cfg)
        if spec is not None and memory and spec.nbytes() > 0.8 * memory:
            raise ConfigError(
                f"stage {stage}'s {'bank' if spec.kind == 'bank' else 'replay buffer'} of {spec.size} slots takes "
                f"{spec.nbytes() / 2**30:.3g} GiB, more than this machine's memory ({memory / 2**30:.3g} GiB) can "
                f"hold: lower {stage}.{'bank_size' if spec.kind == 'bank' else 'buffer_size'}"
            )
        need = cls.memory_bytes(cfg)
        if memory and need * (1 if r.use_gpu else r.num_workers) > 0.8 * memory:
            raise ConfigError(
                f"stage {stage}'s networks with their gradients and optimiser state take {need / 2**30:.3g} GiB per "
                f"worker, more than this machine's memory ({memory / 2**30:.3g} GiB) can hold: shrink network.*"
            )
    if not local:  # the cluster as it is now: connected to here, and the run goes on with this connection
        from ..distributed.cluster import check_cluster_fits, init_ray

        init_ray(cfg, concurrent_runs)
        check_cluster_fits(cfg, stages)
