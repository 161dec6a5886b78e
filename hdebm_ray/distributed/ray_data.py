"""Ray Data ingestion: image folders and parquet shards (local paths or pyarrow-filesystem URIs) streamed into the
Train workers, for datasets too big for every worker to hold.

The driver builds one ``ray.data.Dataset`` per batch stream a stage reads (``StageBase.data_streams``): the files
are read by Ray Data's read tasks (``read_parquet`` / ``read_binary_files``) and decoded, cropped, resized and
mapped to [-1, 1] by ``decode_batch`` in ``map_batches`` CPU tasks, with the same ``data_files.decode_image`` the
in-process readers use, so both paths see the same pixels and a bad file or row fails with its name. TorchTrainer
splits each dataset across the workers (``streaming_split``, equal rows per rank); each rank pulls its share
with ``iter_torch_batches`` (prefetching ``data.prefetch_batches``), epoch after epoch, without end.

Shuffling, every epoch: the files are read in a new random order (``FileShuffleConfig``, seeded by ``run.seed``
and the epoch: for an image folder that is every image, for parquet every shard) and each worker draws its
batches from a local shuffle buffer of ``data.shuffle_buffer`` rows. Not a full global shuffle of parquet rows
(``random_shuffle`` would hold and move the whole epoch before its first batch). After a restart the stream begins
a fresh epoch: Ray Data keeps no position in a checkpoint.

The read and decode tasks may hold ``data.preprocess_cpus`` CPUs at once (Ray Data's ``resource_limits``), on top
of what the Train workers and eval actors hold, so preprocessing can neither starve them nor be starved.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.datasets import STREAMED, build_dataset, fits_in_memory
from ..data.files import (
    IMAGE_SUFFIXES,
    BadImageError,
    DatasetError,
    decode_uint8,
    folder_label,
    image_bytes,
    uint8_to_unit,
)
from ..io.storage import is_uri

ROWS_PER_DECODE_TASK = 256
# Image files a read task may take on (Ray would otherwise pack many small files into few tasks). Parquet row
# groups are packed into read tasks of at most 128 MiB by Ray itself (RAY_DATA_PARQUET_BIN_PACKING_BYTES).
ROWS_PER_READ_TASK = 1024


def uses_ray_data(cfg: Config) -> bool:
    """Whether the stages read ``cfg``'s dataset through Ray Data (``data.loader``; ``auto`` streams a file dataset
    that does not fit ``data.in_memory_mb`` decoded)."""
    loader, d = cfg.data.loader, cfg.data
    return d.dataset in STREAMED and (loader == "ray_data" or (loader == "auto" and not fits_in_memory(cfg)))


def check_stream_fits(cfg: Config, num_items: int, batch_size: int) -> None:
    """Refuse a global batch that no rank's share of an epoch can fill (the stream would yield no batch at all)
    before any worker starts."""
    workers = cfg.ray.num_workers
    if uses_ray_data(cfg) and num_items // workers < batch_size // workers:
        raise DatasetError(
            f"data.path '{cfg.data.path}' holds {num_items} images: {num_items // workers} per worker, fewer than "
            f"one batch of {batch_size // workers} per worker; lower the batch size or ray.num_workers"
        )


class DecodeBatch:
    """The ``map_batches`` function: a batch of encoded images (+ labels or paths) -> ``image`` uint8
    (B, C, R, R) and ``label`` int64. Blocks stay uint8 (a quarter of float32 in the object store and on the
    wire); the worker maps them to [-1, 1] on its device (``data_files.uint8_to_unit``, as the in-process path)."""

    def __init__(
        self,
        resolution: int,
        channels: int,
        root: str | None = None,
        classes: tuple[str, ...] = (),
        on_bad_image: str = "fail",
    ):
        self.resolution, self.channels = resolution, channels
        self.root, self.classes = root, {c: i for i, c in enumerate(classes)}
        self.on_bad_image = on_bad_image

    def label_of(self, path: str) -> int:
        return folder_label(self.root, path, self.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = batch["path"]
        if "bytes" in batch:  # image files
            images, labels = batch["bytes"], [self.label_of(p) for p in paths]
            where = [f"image file '{p}'" for p in paths]
        else:  # parquet rows; ``index`` (written by dataset convert) names the row
            images = [image_bytes(im) for im in batch["image"]]
            rows = batch["index"] if "index" in batch else None
            where = [
                f"parquet shard '{p}'" + (f" row with index {int(rows[i])}" if rows is not None else "")
                for i, p in enumerate(paths)
            ]
            labels = batch["label"] if "label" in batch else np.full(len(images), -1)
            if labels.dtype.kind not in "iu":  # nulls arrive as NaN / None
                bad = next(i for i, v in enumerate(labels) if v is None or v != v or int(v) != v)
                raise DatasetError(f"{where[bad]} has a null or non-integer label ({labels[bad]!r})")
        pairs = zip(images, where, strict=True)
        if self.on_bad_image == "fail":
            out = [decode_uint8(im, self.resolution, self.channels, w).numpy() for im, w in pairs]
            return {"image": np.stack(out), "label": np.asarray(labels, dtype=np.int64)}
        # skip: a bad image stays a blank row marked ``bad``, so the worker can count what it drops
        blank = np.zeros((self.channels, self.resolution, self.resolution), np.uint8)
        out, bad = [], np.zeros(len(images), np.uint8)
        for i, (im, w) in enumerate(pairs):
            try:
                out.append(decode_uint8(im, self.resolution, self.channels, w).numpy())
            except BadImageError as e:
                print(f"[data] skipping an image (data.on_bad_image: skip): {e}", flush=True)
                out.append(blank)
                bad[i] = 1
        return {"image": np.stack(out), "label": np.asarray(labels, dtype=np.int64), "bad": bad}


def stream_seed(cfg: Config, stream: str) -> int:
    """The file-order seed of a stream: each its own (M-JEM's two streams must not read the files in step)."""
    return zlib.crc32(f"{cfg.run.seed}/{stream}".encode())


def build_ray_dataset(cfg: Config, stream: str = "train"):
    """The stream ``stream`` of ``cfg``'s dataset as a ``ray.data.Dataset`` of ``image`` / ``label`` rows."""
    import ray.data

    d = cfg.data
    task_cpus = min(1.0, d.preprocess_cpus)
    # A new file order every epoch (an execution), reproducible from run.seed; streamed, unlike
    # randomize_block_order / random_shuffle, which hold every block of the epoch before the first leaves.
    shuffle = ray.data.FileShuffleConfig(seed=stream_seed(cfg, stream), reseed_after_execution=True)
    files = build_dataset(cfg)  # lists the files once (and names a missing folder); holds no images
    fs = files.fs
    if d.dataset == "parquet":
        columns = ["image"] + [c for c in ("label", "index") if c in files.columns]
        ds = ray.data.read_parquet(
            files.shards,
            filesystem=fs,
            columns=columns,
            include_paths=True,
            shuffle=shuffle,
            num_cpus=task_cpus,
        )
        decode = DecodeBatch(d.resolution, d.channels, on_bad_image=d.on_bad_image)
    else:
        extensions = [s.lstrip(".") for s in IMAGE_SUFFIXES] + [s.lstrip(".").upper() for s in IMAGE_SUFFIXES]
        ds = ray.data.read_binary_files(
            files.base,  # the folder: one recursive listing, not a metadata request per file (object stores)
            filesystem=fs,
            include_paths=True,
            shuffle=shuffle,
            override_num_blocks=max(1, math.ceil(len(files) / ROWS_PER_READ_TASK)),
            file_extensions=extensions,
            num_cpus=task_cpus,
        )
        decode = DecodeBatch(d.resolution, d.channels, files.base, tuple(files.classes), d.on_bad_image)
    ds = ds.map_batches(decode, batch_format="numpy", batch_size=ROWS_PER_DECODE_TASK, num_cpus=task_cpus)
    quiet(ds.context)
    return ds


def quiet(context) -> None:
    """No progress bars and no start / plan / finish lines per epoch in a Ray Data context: from each split
    coordinator they flood the logs (three lines an epoch), and the stage's status line says how far training is."""
    context.enable_progress_bars = context.enable_operator_progress_bars = False
    context.print_on_execution_start = False


def preprocess_limits(cfg: Config, streams: int = 1):
    """What the read and decode tasks of one of ``streams`` streams may hold at once: their share of
    ``data.preprocess_cpus`` CPUs and ``data.preprocess_object_store_mb`` of decoded blocks in flight (Ray's
    backpressure holds the reads back beyond it; its default is a share of the whole object store)."""
    from ray.data import ExecutionResources

    d = cfg.data
    mb = d.preprocess_object_store_mb / streams
    return ExecutionResources(cpu=d.preprocess_cpus / streams, object_store_memory=int(mb * 2**20))


def data_error_in(error: BaseException, kind: type[BaseException] = DatasetError) -> str | None:
    """The message of a ``kind`` error (a ``DatasetError``) behind a failed training run (raised in a worker, a Ray
    Data task or the controller, and wrapped by Ray on the way), or None."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return str(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    match = re.search(rf"{kind.__name__}: (.+)", str(error))  # a failure Ray kept only as text
    return match.group(1).strip() if match else None


def trainer_data(cfg: Config, streams: tuple[str, ...]) -> dict:
    """``TorchTrainer`` keyword arguments for a stage reading ``streams``: ``{}`` unless ``uses_ray_data``."""
    if not uses_ray_data(cfg):
        return {}
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    quiet(DataContext.get_current())  # the trainer hands the driver's context to the split coordinators
    limits = ExecutionOptions(resource_limits=preprocess_limits(cfg, len(streams)))
    if not is_uri(cfg.data.path):  # the datasets are built in the Train controller, whose working dir differs
        cfg = cfg.replace(**{"data.path": str(Path(cfg.data.path).expanduser().resolve())})
    return {
        # callables: built again each time the worker group starts (after a failure too)
        "datasets": {name: (lambda name=name: build_ray_dataset(cfg, name)) for name in streams},
        "dataset_config": DataConfig(datasets_to_split="all", execution_options=limits),
    }


class WorkerStreams:
    """``WorkerContext.batches`` of a Train worker: each named stream's rank shard, batch after batch, epoch
    after epoch; ``metrics()`` counts what arrived (``Data/`` in TensorBoard)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.data, self.device = cfg.data, device
        self.batches: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.skipped: dict[str, int] = {}

    def __call__(self, name: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import ray.train

        shard = ray.train.get_dataset_shard(name)  # a barrier: every rank asks for every stream
        self.batches[name], self.epochs[name], self.skipped[name] = 0, 0, 0
        skipping = self.data.on_bad_image == "skip"
        while True:
            before = self.batches[name]
            batches = shard.iter_torch_batches(
                batch_size=batch_size,
                drop_last=True,
                prefetch_batches=self.data.prefetch_batches,
                local_shuffle_buffer_size=self.data.shuffle_buffer or None,
                # skipping: the rows are filtered on the host (no device read-back per batch), then moved
                device="cpu" if skipping else self.device,
            )
            for x, y in self._without_bad(name, batches, batch_size):
                self.batches[name] += 1
                yield uint8_to_unit(x), y
            if self.batches[name] == before:
                raise DatasetError(
                    f"data stream {name!r}: an epoch held fewer than {batch_size} images for this rank; lower the "
                    f"batch size or ray.num_workers, or add data"
                )
            self.epochs[name] += 1

    def _without_bad(self, name: str, batches, batch_size: int):
        """(image, label) batches of ``batch_size``; under ``on_bad_image: skip`` the rows marked bad are dropped
        (counted) and the batch topped up from the next one."""
        if self.data.on_bad_image == "fail":
            for batch in batches:
                yield batch["image"], batch["label"]
            return
        dev = self.device
        held_x, held_y = [], []
        for batch in batches:  # on the host
            bad = batch["bad"].bool()
            skipped = int(bad.sum())
            if not skipped and not held_x:
                yield batch["image"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)
                continue
            self.skipped[name] += skipped
            held_x.append(batch["image"][~bad])
            held_y.append(batch["label"][~bad])
            x, y = torch.cat(held_x), torch.cat(held_y)
            while len(x) >= batch_size:
                yield x[:batch_size].to(dev, non_blocking=True), y[:batch_size].to(dev, non_blocking=True)
                x, y = x[batch_size:], y[batch_size:]
            held_x, held_y = ([x], [y]) if len(x) else ([], [])

    def metrics(self) -> dict[str, float]:
        out = {f"Data/{name}_batches": float(n) for name, n in self.batches.items()}
        out |= {"Data/skipped_images": float(sum(self.skipped.values()))} if self.data.on_bad_image == "skip" else {}
        return out | {f"Data/{name}_epochs": float(n) for name, n in self.epochs.items()}
