"""What the installed torch and the machine can run of the ``compute`` section, checked while a config is validated
(before any work starts): fp16 only with a GPU, the compile modes this torch has, a fused Adam kernel on CPU.

torch is imported inside the checks: the config is also read where torch need not be loaded (the bank actor's
process, ``--help``)."""

from __future__ import annotations

import functools

# ``max-autotune`` without CUDA graphs: a chain keeps G's output and H's previous results alive across replays of
# H's graph, which CUDA graphs would overwrite in place.
COMPILE_MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_modes() -> tuple[str, ...]:
    """The ``torch.compile`` modes of the installed torch (besides ``none``)."""
    try:
        from torch._inductor import list_mode_options
    except ImportError:
        return ("default",)
    available = list_mode_options()
    return ("default", *(m for m, inductor in COMPILE_MODES.items() if m != "default" and inductor in available))


def problem(section, use_gpu: bool) -> str | None:
    """Why ``section`` cannot run (fp16 without a GPU, a compile mode or fused Adam this torch lacks), or None."""
    import torch

    if section.precision == "fp16" and not use_gpu:
        return "config key 'compute.precision' = 'fp16' needs a GPU (ray.use_gpu: true); on CPU use bf16 or fp32"
    if section.compile != "none" and section.compile not in compile_modes():
        have = ", ".join(("none", *compile_modes()))
        return (
            f"config key 'compute.compile' = {section.compile!r} is not available in torch {torch.__version__}; "
            f"choose one of {have}"
        )
    if section.adam == "fused" and not use_gpu and not _cpu_fused_adam():
        return f"config key 'compute.adam' = 'fused' has no CPU kernel in torch {torch.__version__}; use foreach"
    return None


@functools.cache  # one trial step per process, not one per stage built
def _cpu_fused_adam() -> bool:
    import torch

    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False
