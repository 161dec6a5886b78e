"""Host <-> device copies of the bank's batches, overlapped with compute on a GPU.

The bank lives in host memory (the bank actor or the in-process store); every Stage 1 step checks a batch of
entries out to the device and commits this step's chain ends back. On CUDA both directions go through reused
pinned buffers with non-blocking copies: ``to_device`` enqueues the upload and returns at once, and
``start_to_host`` enqueues the download of the commit on a side stream so that it runs while the generator
update is computed; ``host_arrays`` waits for it only when the commit is sent. Elsewhere they are plain copies.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """Pinned, reused host buffers per field name, and the events that say when a copy through them is done."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._upload: dict[str, torch.Tensor] = {}
        self._download: dict[str, torch.Tensor] = {}
        self._uploaded: torch.cuda.Event | None = None
        self._downloaded: torch.cuda.Event | None = None
        self._copy_stream: torch.cuda.Stream | None = None

    @staticmethod
    def _buffer(pool: dict, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = pool.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = pool[name] = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        return buf

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device tensors of ``arrays`` (copies: the bank's arrays may be read-only views)."""
        if not self.pinned:
            return {k: torch.from_numpy(np.array(a)).to(self.device) for k, a in arrays.items()}
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous step's upload has left the buffers
        out = {}
        for k, a in arrays.items():
            src = torch.from_numpy(np.asarray(a))
            buf = self._buffer(self._upload, k, src)
            buf.copy_(src)
            out[k] = buf.to(self.device, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        return out

    def start_to_host(self, tensors: dict[str, torch.Tensor]) -> None:
        """Begin copying ``tensors`` to the host; ``host_arrays`` returns them once the copy is done.

        On CUDA the copy runs on a side stream that first waits for the work producing ``tensors``, so it
        proceeds while the compute stream runs on (the generator update); ``record_stream`` keeps the caching
        allocator from reusing the tensors' memory before the copy has read it."""
        if not self.pinned:
            self._staged = {k: t.detach() for k, t in tensors.items()}
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self._staged = {}
        with torch.cuda.stream(self._copy_stream):
            for k, t in tensors.items():
                t = t.detach()
                t.record_stream(self._copy_stream)
                buf = self._buffer(self._download, k, t)
                buf.copy_(t, non_blocking=True)
                self._staged[k] = buf
            self._downloaded = torch.cuda.Event()
            self._downloaded.record(self._copy_stream)

    def host_arrays(self) -> dict[str, np.ndarray]:
        """The tensors of the last ``start_to_host`` as host arrays (valid until the next ``start_to_host``)."""
        if self._downloaded is not None:
            self._downloaded.synchronize()
        return {k: t.cpu().numpy() for k, t in self._staged.items()}
