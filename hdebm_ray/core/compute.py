"""Precision and kernels: the ``compute`` section applied to a stage's networks, optimisers and forward passes.

What each key does on a device, and why it is done the way it is:

- ``precision`` bf16 / fp16 runs every network forward under ``torch.autocast`` (the Langevin chain's energy
  evaluations included) and returns the outputs in fp32, so losses, energies and the chain's state and updates
  stay fp32: the chain moves by ε²/2·∇H, which bf16's 8-bit mantissa would round away against |x| ~ 1. fp16 trains
  with a ``GradScaler`` (its range is too small for raw gradients); bf16 needs none.
- ``tf32`` lets CUDA matmuls and convolutions use TF32 tensor cores; ``cudnn_benchmark`` picks the fastest
  convolution algorithms for the (fixed) batch shapes.
- ``channels_last`` stores conv weights NHWC, the layout tensor cores and oneDNN prefer.
- ``compile`` wraps H, G1 and the denoiser in ``torch.compile``; AOTAutograd compiles their backward too, so one
  Langevin step (forward + backward to the input) runs as compiled graphs. The trained modules themselves stay
  plain: checkpoints hold their state_dicts, never the compiled wrapper's. ``max-autotune`` is inductor's
  ``max-autotune-no-cudagraphs`` (see ``COMPILE_MODES``). Improved CD's graph-carrying step stays eager
  (compiled graphs have no double backward).
- fp16 chains: modules a chain differentiates (``fast(..., chain=True)``) stay fp32 under fp16, see ``fast``.
- ``adam``: the fused kernel (one launch for all parameters), foreach (a few launches), or the per-parameter loop.

``config.compute_support.problem`` names what the device or the installed torch cannot do before any work starts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.compute_support import COMPILE_MODES, problem
from ..config.runtime import ComputeSection

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _raise_recompile_limit(limit: int) -> None:
    """One wrapper code object serves H, G1 and D at several shapes, with parameters frozen (chains) or not
    (updates): more graphs than dynamo's default of 8 per code object, past which it falls back to eager."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if "recompile_limit" in dir(config) else "cache_size_limit"  # renamed in torch 2.7
    setattr(config, name, max(getattr(config, name), limit))


class Autocast(nn.Module):
    """``module``'s forward under autocast, outputs cast back to fp32 (energies, logits and images alike)."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if torch.is_floating_point(o) else o for o in out)
        return out.float()


class Compute:
    """The ``compute`` section on one device: wraps modules, builds optimisers and the gradient scaler."""

    def __init__(self, section, device: torch.device, strict: bool = True):
        """``strict=False`` skips the device check: tests run the fp16 + GradScaler path on a CPU (torch can)."""
        self.section, self.device = section, torch.device(device)
        self.dtype = PRECISIONS[section.precision]
        if strict and (why := problem(section, use_gpu=self.device.type == "cuda")) is not None:
            raise ValueError(why)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = section.tf32
            torch.backends.cudnn.allow_tf32 = section.tf32
            torch.backends.cudnn.benchmark = section.cudnn_benchmark

    def layout(self, module: nn.Module) -> nn.Module:
        """``module`` (in place) in the configured memory format."""
        if self.section.channels_last and any(p.dim() == 4 for p in module.parameters()):
            module.to(memory_format=torch.channels_last)
        return module

    def fast(self, module: nn.Module, chain: bool = False) -> nn.Module:
        """What forward passes run through: ``module`` under autocast, compiled; parameters are shared, so its
        updates and state_dict stay those of ``module``.

        ``chain``: the module differentiates a Langevin chain's input. Under fp16 it stays fp32: fp16's 5-bit
        exponent underflows (a stalled chain) or overflows (NaN after the drift clip) input gradients, and a
        chain has no loss scaler; bf16 has fp32's range and is kept.
        """
        dtype = None if (chain and self.section.precision == "fp16") else self.dtype
        if dtype is not None:
            module = Autocast(module, self.device.type, dtype)
        if self.section.compile != "none":
            _raise_recompile_limit(64)
            # dynamic=False: the batch shapes are fixed per stage; a new shape (a tick's sampling) recompiles once.
            module = torch.compile(module, mode=COMPILE_MODES[self.section.compile], dynamic=False)
        return module

    def adam_kwargs(self) -> dict:
        """Adam's kernel choice: ``auto`` is fused on CUDA, foreach elsewhere."""
        choice = self.section.adam
        if choice == "auto":
            choice = "fused" if self.device.type == "cuda" else "foreach"
        if choice == "fused":
            return {"fused": True}
        return {"foreach": choice == "foreach"}

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler that is a no-op unless fp16 trains the parameters."""
        return torch.amp.GradScaler(self.device.type, enabled=self.section.precision == "fp16")


def default_compute(device="cpu") -> Compute:
    """fp32, eager, foreach Adam: what code that builds networks outside a stage (samplers, tests) runs with."""
    return Compute(ComputeSection(), device)
