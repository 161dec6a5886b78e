"""Datasets, all yielding (sample, label) with float samples in [-1, 1], and per-worker sharded batch streams.

- ``digits``: scikit-learn's 1797 real 8×8 handwritten digits, resized; ships with the package (offline default).
- ``toy2d``: 2-D Gaussian mixtures (5×5 grid, ring of 8) as vectors, with their true mode centres.
- ``cifar10``: torchvision's CIFAR-10, downloaded on first use (fails offline with a clear message).
- ``image_folder``: any folder tree of PNG/JPEG images (first-level sub-folders are class labels).
- ``parquet``: shards of encoded image bytes (columns ``image``, optional ``label``), e.g. from ``dataset convert``.

The last two live in files (local or behind a URI) and are read on demand (``data_files``), never held in memory;
whole-dataset passes go through ``iter_batches``. Under Ray Train they reach the workers through Ray Data
(``distributed.ray_data``); ``batch_stream`` is the in-process path (a DataLoader) for the rest.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from ..config import Config
from ..io.storage import is_uri
from ..progress import progress as show_progress
from .files import DatasetError, ImageFiles, ParquetImages, pil_to_unit, uint8_to_unit

__all__ = ["DatasetError", "ImageFiles", "ParquetImages", "pil_to_unit", "uint8_to_unit"]
STREAMED = ("image_folder", "parquet")  # datasets read from files, in bounded memory (``data_files``)


def cache_root(cfg: Config) -> Path:
    """Where what is derived from a dataset is cached (FID reference statistics, the fitted p0): next to the data
    (a local ``data.path``), else ``~/.cache/hdebm_ray/<dataset>`` (for a URI: one folder per URI)."""
    path = cfg.data.path
    if path and not is_uri(path):
        return Path(path)
    home = Path.home() / ".cache" / "hdebm_ray" / cfg.data.dataset
    return home / hashlib.sha1(path.encode()).hexdigest()[:12] if path else home


def data_fingerprint(cfg: Config, dataset=None) -> str:
    """What a cache derived from the data is keyed on besides the config: for a dataset of files, the hash of
    every file's path, size and modification time (``data_files.list_files``; ``dataset`` if already built);
    '' for the in-memory datasets, which a package ships."""
    if cfg.data.dataset not in STREAMED:
        return ""
    return (dataset if dataset is not None else build_dataset(cfg)).fingerprint


# ----------------------------------------------------------------------------------------------------------------
# Image helpers


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] (clipped) -> uint8 in [0, 255], the quantisation used before any feature network."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_batch(x: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.clamp(-1, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Datasets


def digits_dataset(resolution: int, channels: int) -> TensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # values 0..16
    return TensorDataset(resize_batch(x, resolution, channels), torch.tensor(bunch.target, dtype=torch.long))


def toy2d_centres(mixture: str) -> torch.Tensor:
    """True mode centres: a 5×5 grid on [-0.8, 0.8]² or a ring of 8 with radius 0.8."""
    if mixture == "grid":
        g = torch.linspace(-0.8, 0.8, 5)
        return torch.cartesian_prod(g, g)
    if mixture == "ring":
        a = torch.arange(8) * (2 * math.pi / 8)
        return 0.8 * torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    raise ValueError(f"unknown toy2d mixture {mixture!r}")


class Toy2D(TensorDataset):
    """Samples of an equal-weight Gaussian mixture; ``centres`` and ``std`` describe the truth."""

    def __init__(self, mixture: str, std: float, num_samples: int, seed: int = 0):
        self.centres, self.std = toy2d_centres(mixture), std
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(len(self.centres), (num_samples,), generator=g)
        x = self.centres[labels] + std * torch.randn(num_samples, 2, generator=g)
        super().__init__(x, labels)


def cifar10_dataset(root: str, download: bool):
    import torchvision

    root = root or "data/cifar10"
    try:
        return torchvision.datasets.CIFAR10(root=root, train=True, download=download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a missing file without download is a RuntimeError
        raise DatasetError(
            f"CIFAR-10 is not available under '{root}' and could not be downloaded ({e}). On an offline machine, "
            f"put the extracted 'cifar-10-batches-py' folder into '{root}', or convert it elsewhere with "
            f"'hdebm-ray dataset convert --source cifar10' and train with data.dataset=parquet."
        ) from e


class PILDataset(Dataset):
    """Wraps a dataset of (PIL image, label) and converts to [-1, 1] tensors at the configured size."""

    def __init__(self, base, resolution: int, channels: int):
        self.base, self.resolution, self.channels = base, resolution, channels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return pil_to_unit(img, self.resolution, self.channels), int(label)


def build_dataset(cfg: Config) -> Dataset:
    d = cfg.data
    if d.dataset == "digits":
        return digits_dataset(d.resolution, d.channels)
    if d.dataset == "toy2d":
        return Toy2D(d.toy2d_mixture, d.toy2d_std, d.toy2d_num_samples, seed=cfg.run.seed)
    if d.dataset == "cifar10":
        return PILDataset(cifar10_dataset(d.path, d.download), d.resolution, d.channels)
    if d.dataset in ("image_folder", "parquet"):
        files = (ImageFiles if d.dataset == "image_folder" else ParquetImages)(d.path, d.resolution, d.channels)
        files.on_bad_image = d.on_bad_image
        return files
    raise DatasetError(f"unknown data.dataset {d.dataset!r}")


def iter_batches(
    dataset: Dataset, batch_size: int, indices=None, progress: str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The dataset's items (all, or ``indices`` in ascending order) in storage order, ``batch_size`` at a time:
    how the whole-dataset passes (FID reference, p0 fit, conversion) read in bounded memory. ``progress``: a
    label to show progress over the items under (None: silent)."""
    order = range(len(dataset)) if indices is None else sorted(int(i) for i in indices)
    total = len(order)
    if hasattr(dataset, "iter_batches"):  # files: one sequential pass over the shards / files
        batches = dataset.iter_batches(batch_size, None if indices is None else order)
    else:
        batches = (
            (torch.stack([dataset[i][0] for i in chunk]), torch.tensor([int(dataset[i][1]) for i in chunk]))
            for chunk in (order[j : j + batch_size] for j in range(0, total, batch_size))
        )
    shown = progress is not None
    yield from show_progress(batches, desc=progress or "", unit="images", total=total, enabled=shown, size=_first_len)


def _first_len(batch) -> int:
    return len(batch[0])


def random_items(dataset: Dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of ``n`` items (all, if fewer) in a random order fixed by ``seed``. Read in one pass
    over the files they lie in; holds only the ``n`` items."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: max(0, n)]
    if not len(idx):
        raise DatasetError(f"asked for {n} items of a dataset of {len(dataset)}")
    xs, ys = zip(*iter_batches(dataset, 1024, idx.tolist()), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    rank = torch.empty_like(idx)
    rank[idx.argsort()] = torch.arange(len(idx))  # ascending position of each drawn index
    return x[rank], y[rank]


def random_images(dataset: Dataset, n: int, seed: int = 0) -> torch.Tensor:
    """The images of ``n`` items (all, if fewer) in a random order fixed by ``seed``."""
    return random_items(dataset, n, seed)[0]


def check_data_available(cfg: Config) -> None:
    """Open the dataset once in the driver so a missing folder or a bad file fails before any worker starts:
    the first image decoded, or every one (``data.verify: all``, streamed with progress)."""
    ds = build_dataset(cfg)
    if len(ds) < cfg.ray.num_workers:
        raise DatasetError(f"dataset {cfg.data.dataset!r} has {len(ds)} samples, fewer than ray.num_workers")
    if cfg.data.verify == "all":
        for _ in iter_batches(ds, 256, progress=f"data.verify: decoding every image of {cfg.data.dataset}"):
            pass
        if getattr(ds, "skipped", None):
            print(f"data.verify: {len(ds.skipped)} image(s) cannot be decoded; training skips them", flush=True)
    else:
        ds[0]


# ----------------------------------------------------------------------------------------------------------------
# Small file datasets in memory


class DecodedImages(Dataset):
    """A file dataset decoded once at its resolution and held as uint8 (a quarter of float32); items as the files
    give them: [-1, 1] images and labels."""

    def __init__(self, files: Dataset, what: str):
        xs, ys = zip(*iter_batches(files, 1024, progress=f"decoding {what} into memory"), strict=True)
        self.images, self.labels = unit_to_uint8(torch.cat(xs)), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return uint8_to_unit(self.images[i]), int(self.labels[i])


def decoded_mb(cfg: Config, num_items: int) -> float:
    """MB of ``num_items`` images of ``cfg``'s resolution and channels, as uint8."""
    d = cfg.data
    return num_items * d.channels * d.resolution**2 / 2**20


def fits_in_memory(cfg: Config) -> bool:
    """Whether ``cfg``'s file dataset, decoded, is within ``data.in_memory_mb`` (the datasets a package ships are
    held in memory anyway)."""
    d = cfg.data
    if d.dataset not in STREAMED:
        return True
    if d.in_memory_mb == 0:
        return False
    return decoded_mb(cfg, _count(d.dataset, d.path, d.resolution, d.channels)) <= d.in_memory_mb


@functools.cache
def _count(dataset: str, path: str, resolution: int, channels: int) -> int:
    """Items of a file dataset (its files listed, or its shards' footers read, once per process)."""
    files = (ImageFiles if dataset == "image_folder" else ParquetImages)(path, resolution, channels)
    return len(files)


_DECODED: dict[tuple, DecodedImages] = {}


def training_dataset(cfg: Config) -> Dataset:
    """What a stage's in-process batches are drawn from: ``build_dataset``, or for a file dataset that
    ``fits_in_memory`` one decoded copy, shared by every stream of this process."""
    dataset = build_dataset(cfg)
    if cfg.data.dataset not in STREAMED or not fits_in_memory(cfg):
        return dataset
    key = (cfg.data.dataset, cfg.data.path, cfg.data.resolution, cfg.data.channels, dataset.fingerprint)
    if key not in _DECODED:
        _DECODED[key] = DecodedImages(dataset, f"{cfg.data.dataset} '{cfg.data.path}'")
    return _DECODED[key]


# ----------------------------------------------------------------------------------------------------------------
# Sharded batch streams


def batch_stream(
    dataset: Dataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    device="cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of this rank's disjoint shard; a new permutation every epoch."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_rank = len(sampler)
    batch_size = min(batch_size, per_rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        epoch += 1
