"""Evaluation while training runs: a pool of eval actors fed by a Ray Train callback (the Ray side of ``fid.py``).

- The driver creates one ``EvalPool`` actor per run (``eval-<run.name>`` in namespace ``hdebm``) with
  ``eval.actors`` ``EvalActor`` s, each holding its own CPU/GPU share and its feature extractor.
- ``NotifyEvalPool.after_report`` runs in the Train controller: for every registered checkpoint of a stage in
  ``eval.stages`` it calls ``pool.submit`` fire-and-forget, so training never waits for evaluation.
- The pool scores each checkpoint exactly once: it skips what ``<run>/eval.jsonl`` already holds and what is
  queued or running, and only the pool writes results. An eval actor that dies is restarted by Ray and the pool
  hands the checkpoint to it again; a pool started over an existing run first picks up the checkpoints that
  have no result yet (e.g. after the driver crashed).
- Rank 0 of the trainer polls ``pool.latest`` without blocking (``LatestEval``) and adds the newest
  ``Eval/fid`` and the step it belongs to into its reports, where Tune sees them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
import traceback

import ray
from ray.train import UserCallback

from ..config import Config
from ..evaluation.fid import FeatureSpaces, evaluate_checkpoint
from ..evaluation.results import evaluated, read_results, record, scores_text, start_note
from ..evaluation.sampling import default_device
from ..io.checkpoint import load_config_of, run_checkpoints
from ..io.storage import as_uri, local_dir
from .bank_actor import NAMESPACE


def pool_name(cfg: Config) -> str:
    return f"eval-{cfg.run.name}"


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2)  # 2: pid() answers during an evaluation
class EvalActor:
    """Samples a checkpoint with its stage's sampler and scores it; keeps one feature extractor per dataset."""

    def __init__(self, hold_until: str | None = None):

        self.spaces = FeatureSpaces(default_device())
        self.hold_until = hold_until  # testing aid: evaluations wait until this file exists

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, checkpoint: str, num_samples: int, seed: int) -> dict:

        while self.hold_until and not os.path.exists(self.hold_until):
            time.sleep(0.05)
        with local_dir(checkpoint) as d:
            cfg = load_config_of(d)
            result = evaluate_checkpoint(
                d, self.spaces(cfg), num_samples or cfg.eval.num_samples, seed, origin=checkpoint
            )
        return {**result, "checkpoint": checkpoint}


@ray.remote(num_cpus=0, max_restarts=-1)
class EvalPool:
    """The queue of checkpoints to score, the eval actors working it, and where results are written."""

    def __init__(
        self,
        run_location: str,
        num_actors: int,
        actor_resources: dict,
        stages: tuple[str, ...],
        num_samples: int = 0,
        seed: int = 0,
        hold_until: str | None = None,
        max_attempts: int = 3,
    ):

        self.run_location, self.num_samples, self.seed = run_location, num_samples, seed
        self.max_attempts = max_attempts
        self.actor_resources, self.hold_until = actor_resources, hold_until
        self.actors = [EvalActor.options(**actor_resources).remote(hold_until) for _ in range(max(1, num_actors))]
        self.done = evaluated(run_location)
        # Checkpoints of this run without a result (a previous driver died before they were scored).
        self.queue = collections.deque(c for c in run_checkpoints(run_location, stages) if c not in self.done)
        self.running: set[str] = set()
        self.results: list[dict] = []
        self.failures: list[dict] = []
        self.actor_deaths = 0
        self.latest_by_stage: dict[str, dict] = {}
        for result in read_results(run_location):  # a resumed run reports its newest known FID from the start
            self._note_latest(result)
        self.wake: asyncio.Event | None = None
        self.workers: list[asyncio.Task] = []

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
        """Actor ``index``'s result for ``ckpt``, again on the restarted actor if it dies; None (a failure noted)
        if it cannot be scored."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self.actors[index].evaluate.remote(ckpt, self.num_samples, self.seed)
            except ray.exceptions.RayActorError as err:  # the actor died mid-evaluation: Ray restarts it
                self.actor_deaths += 1
                print(f"[eval] actor {index} died scoring {ckpt} (attempt {attempt}): {err}", flush=True)
                await self._until_alive(index)
            except Exception:  # noqa: BLE001 - e.g. a checkpoint removed by retention before its turn
                error = traceback.format_exc(limit=3)
                print(f"[eval] could not score {ckpt}:\n{error}", flush=True)
                self.failures.append({"checkpoint": ckpt, "error": error})
                return None
        self.failures.append({"checkpoint": ckpt, "error": f"eval actor died {self.max_attempts} times"})
        return None

    async def _evaluate(self, index: int, ckpt: str) -> None:
        result = await self._score(index, ckpt)
        if result is None:
            return
        result["evaluated_at"] = time.time()
        async with self.record_lock:  # one writer of eval.jsonl at a time
            await asyncio.to_thread(record, self.run_location, result)
        self.done.add(ckpt)
        self.results.append(result)
        self._note_latest(result)
        print(f"[eval] {result['stage']} step {result['step']}: {scores_text(result)}{start_note(result)}", flush=True)

    def _note_latest(self, result: dict) -> None:
        if result["step"] >= self.latest_by_stage.get(result["stage"], {}).get("step", -1):
            self.latest_by_stage[result["stage"]] = result

    async def _until_alive(self, index: int, timeout_s: float = 300.0) -> None:
        """Wait for Ray to restart actor ``index``; replace it if it is gone for good."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                await self.actors[index].pid.remote()
                return
            except ray.exceptions.ActorUnavailableError:  # restarting
                await asyncio.sleep(0.5)
            except ray.exceptions.RayActorError:  # dead and not restartable: a new one takes its place
                self.actors[index] = EvalActor.options(**self.actor_resources).remote(self.hold_until)

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
        """Wait until nothing is queued or running; returns this pool's results and failures."""
        self._start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.queue or self.running:
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        return {"results": list(self.results), "failures": list(self.failures), **(await self.status())}


def create_eval_pool(cfg: Config, run_location: str, name: str | None = None, **testing):
    """The run's pool (or the one a previous attempt left alive); None when ``eval.actors`` is 0."""
    e = cfg.eval
    if e.actors == 0:
        return None
    # "DEFAULT": outside the caller's placement group. A Tune trial's driver runs in a 0.1-CPU bundle that captures
    # what it starts, where an eval actor's CPU would never fit; the eval actors reserve their own beside the trial.
    resources = {"num_cpus": e.cpus_per_actor, "num_gpus": e.gpus_per_actor, "scheduling_strategy": "DEFAULT"}
    options = {"name": name or pool_name(cfg), "namespace": NAMESPACE, "get_if_exists": True}
    return EvalPool.options(**options, scheduling_strategy="DEFAULT").remote(
        run_location, e.actors, resources, tuple(e.stages), e.num_samples, cfg.run.seed, **testing
    )


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
