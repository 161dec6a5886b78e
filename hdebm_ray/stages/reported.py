"""The metric sets the stages share, by exact key; each stage class declares its own (``StageBase.reports``) from
these. Together they are the names a Tune space's ``metric`` may use (a typo or another stage's metric is refused
when the space is loaded, not found failing in every trial); a test keeps them equal to what the stages report."""

from __future__ import annotations

# Every stage, from the step loop.
LOOP = {"Timing/sec_per_step", "Timing/train_step_s", "Timing/images_per_sec", "step", "nimg"}
# Every stage with eval actors on (``eval.stages``), the newest known score.
EVAL = {"Eval/fid", "Eval/fid_step"}
# The divergence guard in observe mode (guard.mode: observe), on a guarded stage.
OBSERVED = {"Guard/observed_violations"}
# Streamed through Ray Data: per stream (``Data/<stream>_batches`` / ``_epochs``) and the skipped images.
DATA = {"Data/skipped_images"}
# Every energy-based stage: the EBM update, Langevin, the guard, toy2d's quality metrics.
ENERGY = {
    "Energy/abs_gap",
    "Energy/data",
    "Energy/gap",
    "Energy/mad_dropped",
    "Energy/sample",
    "Langevin/clip_fraction",
    "Langevin/drift_norm",
    "Langevin/sample_abs_max",
    "Langevin/step_rms",
    "Loss/energy",
    "Opt/grad_norm_energy",
    "Opt/lr_energy",
    "Eval/toy2d_modes",
    "Eval/toy2d_quality",
    "Guard/rollbacks",
    "Guard/scale",
}
# The shared store's counters (slot_store / bank), for Stage 1's bank and the baselines' replay buffer.
STORE = {
    "Bank/commit_ok",
    "Bank/filled_fraction",
    "Bank/leases_out",
    "Bank/mean_slot_age_steps",
    "Bank/mean_writes_per_slot",
    "Bank/reclaimed_leases",
    "Bank/rejected_commits",
    "Bank/rejected_snapshots",
    "Bank/loaded_snapshot_step",
    "Bank/reconstructed",  # the Ray actor's
}
REPLAY = STORE | ENERGY | {"Bank/distinct_lineages", "Bank/pushed", "Bank/reinit_fraction", "Langevin/chain_move"}
