"""Evaluation while training runs: a pool of eval actors fed by a Ray Train callback (the Ray side of ``fid.py``).

- The driver creates one ``EvalPool`` actor per run (``eval-<run id>`` in namespace ``hdebm``, proving it belongs to
  the run before use) with ``eval.actors`` ``EvalActor`` s, each holding its own CPU/GPU share and its feature
  extractor. The pool itself is placed off spot nodes where the cluster says which.
- ``NotifyEvalPool.after_report`` runs in the Train controller: for every registered checkpoint of a stage in
  ``eval.stages`` it calls ``pool.submit`` fire-and-forget, so training never waits for evaluation.
- The pool scores each checkpoint exactly once: it skips what ``<run>/eval.jsonl`` already holds and what is
  queued or running, and only the pool writes results. An eval actor that dies is restarted by Ray and the pool
  hands the checkpoint to it again; one that runs past ``eval.timeout_s`` is restarted and the checkpoint tried once
  more, then reported as not scored. A pool started over an existing run first picks up the checkpoints that have
  no result yet (e.g. after the driver crashed).
- Ray keeps every checkpoint of a scored stage; the pool removes the ones beyond ``ray.checkpoints_to_keep`` once
  they are scored (or given up), so none is rotated out before its turn.
- The evaluation settings that name files (a TorchScript feature net, Inception's weights) are the run's own, never
  a checkpoint's: loading a file a checkpoint names could run its code.
- Rank 0 of the trainer polls ``pool.latest`` without blocking (``LatestEval``) and adds the newest
  ``Eval/fid`` and the step it belongs to into its reports, where Tune sees them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
import traceback
from dataclasses import dataclass, field

import ray
from ray.train import UserCallback

from ..config import Config
from ..evaluation.features import eval_files
from ..evaluation.fid import FeatureSpaces, evaluate_checkpoint
from ..evaluation.results import evaluated, read_results, record, scores_text, start_note
from ..evaluation.sampling import default_device
from ..io import storage
from ..io.checkpoint import load_config_of, load_meta, run_checkpoints
from ..io.ownership import run_id, run_identity
from ..io.software import check_same_software, software_fingerprint
from ..io.storage import as_uri, local_dir
from .bank_actor import NAMESPACE, owner_check
from .cluster import stable_placement


@dataclass(frozen=True)
class PoolSpec:
    """What a run's eval pool works with."""

    run_location: str
    run: str  # the run's identity (``driver.run_identity``)
    num_actors: int
    actor_resources: dict
    stages: tuple[str, ...]
    eval_files: dict  # FILE_KEYS from the run's config
    num_samples: int = 0  # 0: each checkpoint's eval.num_samples
    seed: int = 0
    keep: int = 2  # checkpoints kept per stage once scored (ray.checkpoints_to_keep)
    timeout_s: float = 7200.0  # eval.timeout_s
    hold_until: str | None = None  # testing aid: evaluations wait until this file exists
    software: dict = field(default_factory=dict)  # the driver's software_fingerprint(): each eval actor must match it


def pool_name(cfg: Config) -> str:
    return f"eval-{run_id(storage.run_dir(cfg))}"


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2)  # 2: pid() answers during an evaluation
class EvalActor:
    """Samples a checkpoint with its stage's sampler and scores it; keeps one feature extractor per dataset."""

    def __init__(self, hold_until: str | None = None, software: dict | None = None):
        self.spaces = FeatureSpaces(default_device())
        self.hold_until = hold_until  # testing aid: evaluations wait until this file exists
        self.software = software  # checked at the first evaluation: a score from other software is no score

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, checkpoint: str, num_samples: int, seed: int, eval_files: dict) -> dict:
        if self.software:
            check_same_software(self.software, "an eval actor")
            self.software = None
        while self.hold_until and not os.path.exists(self.hold_until):
            time.sleep(0.05)
        with local_dir(checkpoint) as d:
            cfg = load_config_of(d).replace(**eval_files)
            result = evaluate_checkpoint(
                d, self.spaces(cfg), num_samples or cfg.eval.num_samples, seed, origin=checkpoint
            )
        return {**result, "checkpoint": checkpoint}


@ray.remote(num_cpus=0, max_restarts=-1)
class EvalPool:
    """The queue of checkpoints to score, the eval actors working it, and where results are written."""

    def __init__(self, spec: PoolSpec, max_attempts: int = 3):
        self.spec, self.max_attempts = spec, max_attempts
        self.actors = [self._new_actor() for _ in range(max(1, spec.num_actors))]
        self.done = evaluated(spec.run_location)
        # Checkpoints of this run without a result (a previous driver died before they were scored).
        self.queue = collections.deque(c for c in run_checkpoints(spec.run_location, spec.stages) if c not in self.done)
        self.running: set[str] = set()
        self.results: list[dict] = []
        self.failures: list[dict] = []
        self.actor_deaths = 0
        self.latest_by_stage: dict[str, dict] = {}
        for result in read_results(spec.run_location):  # a resumed run reports its newest known FID from the start
            self._note_latest(result)
        self.wake: asyncio.Event | None = None
        self.workers: list[asyncio.Task] = []

    def _new_actor(self):
        return EvalActor.options(**self.spec.actor_resources).remote(self.spec.hold_until, self.spec.software)

    def run_identity(self) -> str:
        return self.spec.run

    def _start(self) -> None:
        if self.wake is None:  # the event loop exists once the first call runs
            self.wake, self.record_lock = asyncio.Event(), asyncio.Lock()
            self.workers = [asyncio.get_running_loop().create_task(self._work(i)) for i in range(len(self.actors))]
        self.wake.set()

    async def submit(self, checkpoint: str) -> bool:
        """Queue a checkpoint; False if it has a result, is queued or is being scored already."""
        self._start()
        if checkpoint in self.done or checkpoint in self.queue or checkpoint in self.running:
            return False
        self.queue.append(checkpoint)
        self.wake.set()
        return True

    async def _work(self, index: int) -> None:
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            ckpt = self.queue.popleft()
            self.running.add(ckpt)
            try:
                await self._evaluate(index, ckpt)
            finally:
                self.running.discard(ckpt)
                self.wake.set()  # drain() waits on this too

    async def _score(self, index: int, ckpt: str) -> dict | None:
        """Actor ``index``'s result for ``ckpt``: again on the restarted actor if it dies, once more if it runs past
        ``eval.timeout_s``; None (a failure noted, one line) if it cannot be scored."""
        s, timeouts = self.spec, 0
        for attempt in range(1, self.max_attempts + 1):
            try:
                call = self.actors[index].evaluate.remote(ckpt, s.num_samples, s.seed, s.eval_files)
                return await asyncio.wait_for(asyncio.wrap_future(call.future()), timeout=s.timeout_s)
            except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11, two before
                timeouts += 1
                print(f"[eval] scoring {ckpt} ran past eval.timeout_s = {s.timeout_s:g} s: its actor is restarted")
                await self._restart(index)
                if timeouts == 2:
                    self._failed(ckpt, f"timed out twice (eval.timeout_s = {s.timeout_s:g} s)")
                    return None
            except ray.exceptions.RayActorError as err:  # the actor died mid-evaluation: Ray restarts it
                self.actor_deaths += 1
                print(f"[eval] actor {index} died scoring {ckpt} (attempt {attempt}): {err}", flush=True)
                await self._until_alive(index)
            except Exception:  # noqa: BLE001 - e.g. a checkpoint removed before its turn
                self._failed(ckpt, traceback.format_exc(limit=3))
                return None
        self._failed(ckpt, f"eval actor died {self.max_attempts} times")
        return None

    def _failed(self, ckpt: str, error: str) -> None:
        """Give ``ckpt`` up; the driver names it, with the reason's last line, when the pool drains."""
        self.failures.append({"checkpoint": ckpt, "error": error, "reason": error.strip().splitlines()[-1]})
        self.done.add(ckpt)  # given up: retention may remove it now

    async def _evaluate(self, index: int, ckpt: str) -> None:
        result = await self._score(index, ckpt)
        if result is not None:
            result["evaluated_at"] = time.time()
            try:
                async with self.record_lock:  # one writer of eval.jsonl at a time
                    await asyncio.to_thread(record, self.spec.run_location, result)
            except Exception as e:  # noqa: BLE001 - e.g. storage unreachable: this worker loop must live on
                self._failed(ckpt, f"scored, but eval.jsonl could not be written: {e}")
                return
            self.done.add(ckpt)
            self.results.append(result)
            self._note_latest(result)
            line = f"{scores_text(result)}{start_note(result)}"
            print(f"[eval] {result['stage']} step {result['step']}: {line}", flush=True)
        try:
            async with self.record_lock:  # one pruner at a time: two would race over one stage's folders
                await asyncio.to_thread(self._prune, ckpt)
        except Exception as e:  # noqa: BLE001 - a checkpoint left behind is no reason to stop scoring
            print(f"[eval] could not prune old checkpoints beside {ckpt}: {e}", flush=True)

    def _prune(self, ckpt: str) -> None:
        """Remove the scored checkpoints of ``ckpt``'s stage beyond the newest ``keep`` (never one still waiting)."""
        stage_dir = ckpt.rstrip("/").rsplit("/", 1)[0]
        run_location, stage = stage_dir.rsplit("/", 1)
        found = sorted(run_checkpoints(run_location, [stage]), key=lambda c: load_meta(c)["step"])
        for old in found[: max(0, len(found) - self.spec.keep)]:
            if old in self.done and old not in self.running and old not in self.queue:
                storage.remove_tree(old)

    def _note_latest(self, result: dict) -> None:
        if result["step"] >= self.latest_by_stage.get(result["stage"], {}).get("step", -1):
            self.latest_by_stage[result["stage"]] = result

    async def _restart(self, index: int) -> None:
        """Kill stuck actor ``index`` and wait for its successor: until it dies, the old process still answers."""
        try:
            stuck = await asyncio.wait_for(asyncio.wrap_future(self.actors[index].pid.remote().future()), 30)
        except Exception:  # noqa: BLE001 - not answering at all: any process that answers next is a new one
            stuck = None
        ray.kill(self.actors[index], no_restart=False)
        await self._until_alive(index, not_pid=stuck)

    async def _until_alive(self, index: int, timeout_s: float = 300.0, not_pid: int | None = None) -> None:
        """Wait for Ray to restart actor ``index`` (a process other than ``not_pid``); replace it if it is gone for
        good."""
        deadline, died = time.monotonic() + timeout_s, 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                call = self.actors[index].pid.remote()
                if await asyncio.wait_for(asyncio.wrap_future(call.future()), left) != not_pid or not_pid is None:
                    return
                await asyncio.sleep(0.2)
            except (TimeoutError, asyncio.TimeoutError):
                return  # not back within the deadline: the next call on it fails, and is counted there
            except ray.exceptions.ActorUnavailableError:  # restarting
                await asyncio.sleep(0.5)
            except ray.exceptions.RayActorError:  # a call on the process being replaced, or dead for good
                died += 1
                if died >= 3:  # three in a row, a second apart: not a restart; a new actor takes its place
                    self.actors[index], died = self._new_actor(), 0
                await asyncio.sleep(1.0)

    async def latest(self, stage: str) -> dict | None:
        """The newest-step result of a stage so far (None before the first)."""
        self._start()
        return self.latest_by_stage.get(stage)

    async def status(self) -> dict:
        self._start()
        return {
            "queued": len(self.queue),
            "running": len(self.running),
            "done": len(self.results),
            "failed": len(self.failures),
            "actor_deaths": self.actor_deaths,
        }

    async def actor_handles(self) -> list:
        return list(self.actors)

    async def drain(self, timeout_s: float | None = None) -> dict:
        """Wait until nothing is queued or running (at most ``timeout_s``); returns this pool's results, failures
        and what is still queued or running."""
        self._start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.queue or self.running:
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        left = sorted(self.queue) + sorted(self.running)
        return {"results": list(self.results), "failures": list(self.failures), "left": left, **(await self.status())}


def create_eval_pool(cfg: Config, run_location: str, name: str | None = None, software: dict | None = None, **testing):
    """The run's pool (or the one a previous attempt left alive), checked to be this run's; None when
    ``eval.actors`` is 0. ``software``: the fingerprint its eval actors must match (this process's by default)."""
    e = cfg.eval
    if e.actors == 0:
        return None
    # "DEFAULT": outside the caller's placement group. A Tune trial's driver runs in a 0.1-CPU bundle that captures
    # what it starts, where an eval actor's CPU would never fit; the eval actors reserve their own beside the trial.
    resources = {"num_cpus": e.cpus_per_actor, "num_gpus": e.gpus_per_actor, "scheduling_strategy": "DEFAULT"}
    spec = PoolSpec(
        run_location,
        run_identity(run_location),
        e.actors,
        resources,
        tuple(e.stages),
        eval_files(cfg),
        e.num_samples,
        cfg.run.seed,
        keep=cfg.ray.checkpoints_to_keep,
        timeout_s=e.timeout_s,
        software=software or software_fingerprint(),
        **testing,
    )
    name = name or pool_name(cfg)
    options = {"name": name, "namespace": NAMESPACE, "get_if_exists": True, **stable_placement()}
    pool = EvalPool.options(**options).remote(spec)  # stable_placement: outside any placement group
    owner_check(pool, name, spec.run)
    return pool


def shutdown_pool(pool) -> None:
    try:
        actors = ray.get(pool.actor_handles.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        actors = []
    for actor in actors:
        ray.kill(actor, no_restart=True)
    ray.kill(pool, no_restart=True)


class NotifyEvalPool(UserCallback):
    """Runs in the Train controller: hands each registered checkpoint of a scored stage to the pool."""

    def __init__(self, pool_name: str, stage: str, run_location: str):
        self.pool_name, self.stage, self.run_location = pool_name, stage, run_location
        self._pool = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is None:
            return

        if self._pool is None:
            self._pool = ray.get_actor(self.pool_name, namespace=NAMESPACE)
        self._pool.submit.remote(as_uri(checkpoint.path, self.run_location))  # fire and forget


class LatestEval:
    """Rank 0's non-blocking view of the pool's newest result for its stage, for the trainer's reports."""

    def __init__(self, pool_name: str, stage: str):
        self.pool = ray.get_actor(pool_name, namespace=NAMESPACE)
        self.stage, self.pending, self.metrics = stage, None, {"Eval/fid": float("nan"), "Eval/fid_step": -1.0}

    def poll(self) -> dict[str, float]:
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if ready:
                try:
                    latest = ray.get(self.pending)
                except ray.exceptions.RayError:
                    latest = None
                if latest:
                    self.metrics = {"Eval/fid": float(latest["fid"]), "Eval/fid_step": float(latest["step"])}
                self.pending = None
        if self.pending is None:
            self.pending = self.pool.latest.remote(self.stage)
        return dict(self.metrics)
