"""What a running stage shows: rank 0's TensorBoard scalars and sample grids, and one status line per tick.

The tick line, after NVlabs/edm's training status line::

    [stage1] step 200/1000 kimg 25.6 g=0.5 sec/step 0.150 sec/kimg 1.17 ETA 0:02:00 peak mem host 1.52 GiB gpu 3.10 GiB

ETA is the remaining steps at this tick's sec/step; the memory figures are this process's peaks so far (host: peak
RSS; gpu: ``torch.cuda.max_memory_allocated``, only when CUDA is in use). They also go to TensorBoard as
``Resources/peak_host_mem_gib`` and ``Resources/peak_device_mem_gib``.
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from ..core.ranks import status
from ..evaluation.images import data_grid, grid_image
from ..io.storage import copy_file, is_uri
from ..progress import hms

GIB = 2**30


def peak_host_mem_gib() -> float:
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS), in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB


def peak_device_mem_gib(device=None) -> float | None:
    """Peak CUDA memory allocated by this process on ``device`` (default: the current one), in GiB; None when
    CUDA is not in use (CPU runs)."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    if device is None and not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def resource_scalars(stage) -> dict[str, float]:
    """The peak memory figures as TensorBoard scalars (``Resources/...``)."""
    ctx = getattr(stage, "ctx", None)
    out = {"Resources/peak_host_mem_gib": peak_host_mem_gib()}
    device_mem = peak_device_mem_gib(getattr(ctx, "device", None))
    if device_mem is not None:
        out["Resources/peak_device_mem_gib"] = device_mem
    return out


def tick_line(stage, step: int, metrics: dict[str, float], resources: dict[str, float]) -> str:
    """The one-line status of a report tick (see the module docstring)."""
    nimg = step * stage.images_per_step
    losses = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k.startswith("Loss/"))
    parts = [f"[{stage.name}] step {step}/{stage.total_steps} kimg {nimg / 1000:.1f}"] + ([losses] if losses else [])
    if rollbacks := int(metrics.get("Guard/rollbacks", 0)):  # the divergence guard has backed this stage off
        parts.append(f"guard: {rollbacks} rollback(s), x{metrics.get('Guard/scale', 1):g}")
    sps = metrics.get("Timing/sec_per_step")
    if sps is not None:  # none: a stage with nothing to train
        parts.append(f"sec/step {sps:.3f}")
        if stage.images_per_step:
            parts.append(f"sec/kimg {sps / stage.images_per_step * 1000:.3g}")
        parts.append(f"ETA {hms(max(0, stage.total_steps - step) * sps)}")
    mem = f"peak mem host {resources['Resources/peak_host_mem_gib']:.2f} GiB"
    if "Resources/peak_device_mem_gib" in resources:
        mem += f" gpu {resources['Resources/peak_device_mem_gib']:.2f} GiB"
    return " ".join(parts + [mem])


class StageLogger:
    """Rank 0's TensorBoard scalars (x-axis: images seen) and a one-line status per report tick.

    Under a URI storage the events are written to a local folder and the event file that changed is uploaded after
    every tick; a file is closed and a new one begun once it passes ``ROLL_BYTES``, so a tick's upload stays bounded
    however long the run. The local folder is removed when the logger closes.
    """

    ROLL_BYTES = 4 * 2**20

    def __init__(self, stage, log_dir: str | None, enabled: bool):
        self.stage, self.writer, self.upload_to, self.local, self.data_logged = stage, None, None, None, False
        self.uploaded: dict[str, int] = {}  # local event file -> size when last uploaded
        if enabled and log_dir:
            target = f"{log_dir}/{stage.name}"
            if is_uri(target):
                self.upload_to, self.local = target, tempfile.mkdtemp(prefix="hdebm-tb-")
                target = self.local
            self.writer = SummaryWriter(log_dir=target)
        self.enabled = enabled

    def log(self, step: int, metrics: dict[str, float], with_images: bool = False) -> None:
        if not self.enabled:
            return
        nimg = step * self.stage.images_per_step
        resources = resource_scalars(self.stage)
        if self.writer is not None:
            for k, v in {**metrics, **resources}.items():
                self.writer.add_scalar(k, v, nimg)
            if with_images:
                self._log_images(step, nimg)
            self.writer.flush()
            if self.upload_to:
                self._upload_changed()
        status(tick_line(self.stage, step, metrics, resources))

    def _upload_changed(self, final: bool = False) -> None:
        """Upload the event files that grew since their last upload; past ``ROLL_BYTES`` close the current one
        (uploaded once more, then deleted here) and begin the next."""
        for path in sorted(Path(self.local).glob("events.out.tfevents.*")):
            size = path.stat().st_size
            if self.uploaded.get(path.name) != size:
                copy_file(path, f"{self.upload_to}/{path.name}")
                self.uploaded[path.name] = size
        if not final and any(size > self.ROLL_BYTES for size in self.uploaded.values()):
            self.writer.close()  # flushed and uploaded above
            for name in self.uploaded:
                (Path(self.local) / name).unlink(missing_ok=True)
            self.uploaded = {}
            self.writer = SummaryWriter(log_dir=self.local)

    def _log_images(self, step: int, nimg: int) -> None:
        grids = self.stage.tick_images(step)
        if grids and not self.data_logged:  # stages with grids have a cfg
            grids["Samples/data"] = data_grid(self.stage.cfg)
            self.data_logged = True
        for tag, images in grids.items():
            self.writer.add_image(tag, grid_image(images, self.stage.cfg), nimg)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if self.upload_to:
                self._upload_changed(final=True)
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None
