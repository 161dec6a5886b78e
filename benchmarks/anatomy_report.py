"""The step-anatomy benchmark's tables and goal checks (``step_anatomy.py`` measures; this formats)."""

from __future__ import annotations

# Goals of the speed work: on CPU a Langevin step within 15% of the bare forward+backward-to-input of H and a
# Stage 1 step within 15% of its ideal; on a GPU the cifar10 paper-config Stage 1 step under 0.4 s.
LANGEVIN_OVER_FWD_BWD_MAX = 1.15
STEP_OVER_IDEAL_MAX = 1.15
GPU_STAGE1_STEP_MAX_S = 0.4

ROWS = {
    "stage1": [
        ("fwd_bwd_input_s", "H forward + backward to the input"),
        ("langevin_step_s", "one Langevin step (chain / K)"),
        ("chain_s", "K Langevin steps on Y"),
        ("g_pass_s", "one G pass (G2∘G1, no grad)"),
        ("h_update_s", "H's update"),
        ("g1_update_s", "G1's update"),
        ("ideal_s", "ideal = G pass + K steps + H update + G1 update"),
        ("step_s", "the whole Stage 1 step"),
        ("step_over_ideal", "step / ideal"),
        ("langevin_step_over_fwd_bwd", "Langevin step / fwd-bwd"),
        ("compile_first_step_s", "first step (compilation included)"),
    ],
    "stage2": [
        ("fwd_bwd_input_s", "H forward + backward to the input"),
        ("chain_s", "the joint chain (Y, z1, z2)"),
        ("h_update_s", "H's update"),
        ("ideal_s", "ideal = chain + H update"),
        ("step_s", "the whole Stage 2 step"),
        ("step_over_ideal", "step / ideal"),
        ("chain_over_y_fwd_bwd", "chain / (K x H fwd-bwd)"),
        ("compile_first_step_s", "first step (compilation included)"),
    ],
    "diffusion": [
        ("fwd_bwd_s", "loss forward + backward"),
        ("opt_step_s", "Adam step"),
        ("ideal_s", "ideal = fwd-bwd + Adam step"),
        ("step_s", "the whole diffusion step"),
        ("step_over_ideal", "step / ideal"),
        ("compile_first_step_s", "first step (compilation included)"),
    ],
}


def _fmt(key: str, v: float) -> str:
    return f"{v:.3f}" if not key.endswith("_s") else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.3f} s")


def markdown(result: dict) -> str:
    variants = list(result["variants"])
    head = (
        f"# Step anatomy: {result['preset']} on {result['device']}\n\n"
        f"torch {result['torch']}, {result['threads']} thread(s); Stage 1 batch {result['stage1_batch_size']}, "
        f"K = {result['stage1_langevin_steps']}; Stage 2 batch {result['stage2_batch_size']}, "
        f"K = {result['stage2_langevin_steps']}; diffusion batch {result['diffusion_batch_size']}. "
        "Medians of repeated calls, each part timed alone.\n"
    )
    parts = [head]
    for stage, rows in ROWS.items():
        lines = [f"\n## {stage}\n", "| measure | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for key, label in rows:
            cells = [_fmt(key, result["variants"][v][stage][key]) for v in variants]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    if len(variants) > 1:
        base = variants[0]
        lines = [f"\n## speed-up over {base} (step time ratio)\n", "| stage | " + " | ".join(variants[1:]) + " |"]
        lines.append("|---" * len(variants) + "|")
        for stage in ROWS:
            b = result["variants"][base][stage]["step_s"]
            cells = [f"{b / result['variants'][v][stage]['step_s']:.2f}x" for v in variants[1:]]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    sc = result.get("scaling", {})
    if "scaling_efficiency" in sc:
        parts.append(
            "\n## 1 vs 2 workers (gloo, Stage 1, same global batch)\n\n"
            f"| 1 worker | 2 workers | speed-up | efficiency |\n|---|---|---|---|\n"
            f"| {_fmt('s_s', sc['stage1_step_s_1_workers'])} | {_fmt('s_s', sc['stage1_step_s_2_workers'])} | "
            f"{sc['speedup_2_over_1']:.2f}x | {sc['scaling_efficiency']:.2f} |\n"
        )
    elif sc:
        parts.append(f"\n1 vs 2 workers: skipped ({sc['skipped']}).\n")
    parts.append("\n" + "\n".join(f"- {line}" for line in goals_lines(result)) + "\n")
    return "".join(parts)


def goals_lines(result: dict) -> list[str]:
    """One line per goal: the measured value, the bound, and whether it is met."""
    lines = []
    for key, v in result["variants"].items():
        s1 = v["stage1"]
        if result["device"] == "cpu":
            a, b = s1["langevin_step_over_fwd_bwd"], s1["step_over_ideal"]
            lines.append(
                f"{key}: Langevin step / fwd-bwd = {a:.3f} (goal <= {LANGEVIN_OVER_FWD_BWD_MAX}: "
                f"{'met' if a <= LANGEVIN_OVER_FWD_BWD_MAX else 'NOT met'}); Stage 1 step / ideal = {b:.3f} "
                f"(goal <= {STEP_OVER_IDEAL_MAX}: {'met' if b <= STEP_OVER_IDEAL_MAX else 'NOT met'})"
            )
        else:
            t = s1["step_s"]
            lines.append(
                f"{key}: Stage 1 step = {t:.3f} s (goal <= {GPU_STAGE1_STEP_MAX_S} s: "
                f"{'met' if t <= GPU_STAGE1_STEP_MAX_S else 'NOT met'})"
            )
    return lines
