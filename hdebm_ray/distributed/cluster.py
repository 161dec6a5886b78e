"""The Ray cluster a run uses: connect to one (``ray.address``, ``$RAY_ADDRESS``, ``ray job submit``) or start an
embedded local Ray sized for the run, and what a stage's workers, eval actors and Ray Data hold at once."""

from __future__ import annotations

import math
import os
import socket

import ray

from ..config import Config, ConfigError
from ..io import storage
from ..stages import stage_class
from .bank_actor import NAMESPACE
from .ray_compat import check_ray_version
from .ray_data import uses_ray_data

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train V2's, on by default
RAY_DATA_LOG_LEVEL = "RAY_DATA_LOG_LEVEL"


def local_cpus(cfg: Config, concurrent_runs: int = 1, extra_cpus: float = 0.0) -> int:
    """Logical CPUs of an embedded local Ray: the machine's, or more when ``concurrent_runs`` runs' workers, eval
    actors and Ray Data (plus ``extra_cpus``: a sweep's trial drivers) would not fit in them at once.

    Eval actors hold their CPUs for the whole run: counted on top of the workers, or the next stage's workers could
    never be placed next to them on a small machine (nor a sweep trial's beside its driver's bundle)."""
    # - 1e-9: a sum of fractional CPUs (3 x 0.1) lands a hair above the integer it is, and ceil would add a CPU
    return max(os.cpu_count() or 1, math.ceil(concurrent_runs * resources_needed(cfg)["CPU"] + extra_cpus - 1e-9))


def init_ray(cfg: Config, concurrent_runs: int = 1, extra_cpus: float = 0.0) -> None:
    """Connect to the cluster named by ray.address / $RAY_ADDRESS, or start an embedded local one (sized by
    ``local_cpus``)."""
    check_ray_version()
    if ray.is_initialized():
        return
    # Report ticks wait for the controller's poll; the 2 s default dominates short CPU steps.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    # A submitted job already has its runtime env (jobs/runtime_env.yaml sets the same variable); Ray refuses
    # to merge a second one into it.
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}}
    # Ray Data's INFO lines ("Dataset ... execution finished", one per epoch and stream from each split coordinator)
    # drown the stage's status lines; its warnings and errors still show.
    env["env_vars"][RAY_DATA_LOG_LEVEL] = os.environ.setdefault(RAY_DATA_LOG_LEVEL, "WARNING")
    num_cpus = None
    if address == "local":
        # One machine has no node to lose to preemption: no watcher actor (a process per Train run) to start.
        env["env_vars"][PREEMPTION_WATCHER] = os.environ.get(PREEMPTION_WATCHER, "0")
        num_cpus = local_cpus(cfg, concurrent_runs, extra_cpus)
    else:
        check_reachable(address, cfg.ray.connect_timeout_s)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            num_cpus=num_cpus,
            log_to_driver=True,
            runtime_env=None if in_job else env,
        )
    except ConnectionError as e:  # something answered at the address, but not a Ray cluster
        if address == "local":
            raise
        raise ConfigError(f"ray.address {address!r}: no Ray cluster there ({str(e).splitlines()[0]})") from None
    storage.check_shared_storage(cfg, num_nodes=sum(1 for n in ray.nodes() if n.get("Alive")))


def check_reachable(address: str, timeout_s: float) -> None:
    """A ConfigError within ``timeout_s`` if nothing listens at a cluster address (``ray.init`` would retry for
    minutes). 'auto' finds a local cluster by itself and fails at once without one."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address {address!r} must be host:port, ray://host:port, 'auto', or '' (local)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"ray.address {address!r}: nothing answers at {host}:{port} within {timeout_s:g} s ({e}); is the cluster "
            f"up and reachable from here? (wait longer: ray.connect_timeout_s)"
        ) from None


def resources_needed(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs a stage's workers, the run's eval actors and Ray Data's preprocessing hold at the same time."""
    r, e = cfg.ray, cfg.eval
    preprocess = cfg.data.preprocess_cpus if uses_ray_data(cfg) else 0.0
    return {
        "CPU": r.num_workers * r.cpus_per_worker + e.actors * e.cpus_per_actor + preprocess,
        "GPU": (r.num_workers if r.use_gpu else 0) + e.actors * e.gpus_per_actor,
    }


def warn_if_pool_starves_workers(cfg: Config) -> None:
    """Eval actors hold their CPUs/GPUs for the whole run: on a cluster that cannot fit them next to the workers,
    a stage's worker group would wait forever (unless an autoscaler adds nodes)."""
    e, total = cfg.eval, ray.cluster_resources()
    for res, need in resources_needed(cfg).items():
        if need > total.get(res, 0.0) + 1e-9:
            print(
                f"[eval] warning: the workers and {e.actors} eval actor(s) need {need:g} {res} but the cluster has "
                f"{total.get(res, 0.0):g}; without an autoscaler the workers will wait for the eval actors. Lower "
                f"eval.actors / eval.cpus_per_actor / eval.gpus_per_actor or ray.num_workers.",
                flush=True,
            )


def check_cluster_fits(cfg: Config, stages: list[str]) -> None:
    """On a cluster: a worker, an eval actor and each stage's bank must each fit one node. Nodes an autoscaler has
    not started yet are unknown here, so what no alive node holds is one warning line per kind, not an error."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    biggest = {res: max((n.get(res, 0.0) for n in nodes), default=0.0) for res in ("CPU", "GPU", "memory")}
    r, e = cfg.ray, cfg.eval
    wants = [("a Train worker", {"CPU": r.cpus_per_worker, "GPU": 1.0 if r.use_gpu else 0.0})]
    if e.actors:
        wants.append(("an eval actor", {"CPU": e.cpus_per_actor, "GPU": e.gpus_per_actor}))
    for stage in stages:
        if (spec := stage_class(stage).bank_spec(cfg)) is not None:
            wants.append((f"stage {stage}'s {spec.kind}", {"memory": 1.3 * spec.nbytes()}))
    for what, need in wants:
        short = [f"{v:g} {k}" for k, v in need.items() if v > biggest[k] + 1e-9]
        if short:
            print(
                f"[cluster] warning: {what} needs {', '.join(short)}, more than any node of the cluster has now; "
                "it waits until an autoscaler adds a node that does",
                flush=True,
            )


MARKET_TYPE = "ray.io/market-type"  # the node label Ray sets from RAY_NODE_MARKET_TYPE (KubeRay, our launcher configs)


def stable_placement(memory_bytes: int = 0) -> dict:
    """Actor options for what must outlive a preemption (the bank actor, the eval pool): nodes that are not spot,
    where the cluster marks which are (some alive node carries ``ray.io/market-type``); and a reservation of
    ``memory_bytes`` of Ray's logical memory, so the actor lands on a node that can hold its store."""
    # outside any placement group: a Tune trial's driver runs in one whose bundle holds no memory reservation
    options: dict = {"scheduling_strategy": "DEFAULT"}
    labelled = [n for n in ray.nodes() if n.get("Alive") and MARKET_TYPE in (n.get("Labels") or {})]
    if any(n["Labels"][MARKET_TYPE] == "spot" for n in labelled):
        options["label_selector"] = {MARKET_TYPE: "!spot"}
    if memory_bytes:
        options["memory"] = int(memory_bytes)
    return options
