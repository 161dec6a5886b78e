"""Ray Tune's synchronous PBT, kept from stalling after a sweep is restored (Ray 2.60).

Tune does not save the scheduler's state with the experiment: a restored sweep starts PBT afresh, with its next
synchronisation point at one interval. When every trial then reports at a step T of two intervals or more, PBT
perturbs and moves the point to ``max(point + interval, T) = T``, and ``choose_trial_to_run`` restarts only paused
trials whose clock is below it: none is, and the sweep waits forever (ray-project/ray PR 48616, not merged).

The same stall follows a trial that fails for good (a divergence past ``guard.max_rollbacks``, a worker group
that never starts) while the others wait for it at the point: only a result perturbs, and no trial is left to
report one. Then the waiting trials are released to the next point; that one round's exploit is skipped.
"""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining


def next_sync_point(point: float, clocks: list[float], interval: float) -> float:
    """The synchronisation point after a result: unchanged unless every unfinished trial has reached it, which
    only happens when PBT has just perturbed at it; then one interval past the furthest clock."""
    if clocks and min(clocks) >= point:
        return max(clocks) + interval
    return point


class SynchronousPBT(PopulationBasedTraining):
    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        self._move_sync_point(tune_controller)
        return decision

    def on_trial_error(self, tune_controller, trial):
        # Tune calls this for a retry too (the trial is requeued and will report again): the condition is Tune's own
        retrying = trial.status == Trial.RUNNING and trial.should_recover()
        super().on_trial_error(tune_controller, trial)
        if not retrying:
            self._move_sync_point(tune_controller, gone=trial)

    def _move_sync_point(self, tune_controller, gone=None) -> None:
        clocks = [
            self._trial_state[t].last_train_time
            for t in tune_controller.get_trials()
            if t in self._trial_state and not t.is_finished() and t is not gone
        ]
        self._next_perturbation_sync = next_sync_point(
            self._next_perturbation_sync, clocks, self._perturbation_interval
        )
