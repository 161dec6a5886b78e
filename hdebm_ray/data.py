"""Datasets, all yielding (sample, label) with float samples in [-1, 1], and per-worker sharded batch streams.

- ``digits``: scikit-learn's 1797 real 8×8 handwritten digits, resized; ships with the package (offline default).
- ``toy2d``: 2-D Gaussian mixtures (5×5 grid, ring of 8) as vectors, with their true mode centres.
- ``cifar10``: torchvision's CIFAR-10, downloaded on first use (fails offline with a clear message).
- ``image_folder``: any folder tree of PNG/JPEG images (first-level sub-folders are class labels).
- ``parquet``: shards of encoded image bytes (columns ``image``, ``label``), written by ``dataset convert``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .config import Config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetError(RuntimeError):
    """The dataset cannot be read; the message says which file or folder and what to do."""


def cache_root(cfg: Config) -> Path:
    """Where what is derived from a dataset is cached (FID reference features, the fitted p0): next to the data
    (``data.path``), else ``~/.cache/hdebm_ray/<dataset>``."""
    return Path(cfg.data.path) if cfg.data.path else Path.home() / ".cache" / "hdebm_ray" / cfg.data.dataset


# ----------------------------------------------------------------------------------------------------------------
# Image helpers


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (…, C, H, W) in [0, 255] -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] (clipped) -> uint8 in [0, 255], the quantisation used before any feature network."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pil_to_unit(img: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """Centre-crop to a square, resize (bicubic, antialiased) and map to [-1, 1], shape (C, R, R)."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    arr = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
    return uint8_to_unit(arr)


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


class ImageFiles(Dataset):
    """(PIL image, label) for every image file below ``root``; labels index the first-level folders."""

    def __init__(self, root: str):
        base = Path(root)
        if not base.is_dir():
            raise DatasetError(f"image folder '{root}' (data.path) does not exist or is not a folder")
        self.files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetError(f"image folder '{root}' (data.path) holds no {'/'.join(IMAGE_SUFFIXES)} files")
        classes = sorted({p.relative_to(base).parts[0] for p in self.files if len(p.relative_to(base).parts) > 1})
        index = {c: i for i, c in enumerate(classes)}
        self.labels = [index.get(p.relative_to(base).parts[0], -1) for p in self.files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return Image.open(self.files[i]), self.labels[i]
        except OSError as e:
            raise DatasetError(f"cannot decode image file '{self.files[i]}': {e}") from e


class ParquetImages(Dataset):
    """(PIL image, label) from every ``*.parquet`` shard in a folder (columns ``image``: bytes, ``label``)."""

    def __init__(self, root: str):
        import pyarrow.parquet as pq

        shards = sorted(Path(root).glob("*.parquet")) if Path(root).is_dir() else []
        if not shards:
            raise DatasetError(f"parquet folder '{root}' (data.path) holds no .parquet shards")
        self.images, self.labels = [], []
        for shard in shards:
            table = pq.read_table(shard)
            if "image" not in table.column_names:
                raise DatasetError(f"parquet shard '{shard}' has no 'image' column (has {table.column_names})")
            self.images += table.column("image").to_pylist()
            n = table.num_rows
            self.labels += table.column("label").to_pylist() if "label" in table.column_names else [-1] * n

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.open(io.BytesIO(self.images[i])), self.labels[i]


def build_dataset(cfg: Config) -> Dataset:
    d = cfg.data
    if d.dataset == "digits":
        return digits_dataset(d.resolution, d.channels)
    if d.dataset == "toy2d":
        return Toy2D(d.toy2d_mixture, d.toy2d_std, d.toy2d_num_samples, seed=cfg.run.seed)
    if d.dataset == "cifar10":
        return PILDataset(cifar10_dataset(d.path, d.download), d.resolution, d.channels)
    if d.dataset == "image_folder":
        return PILDataset(ImageFiles(d.path), d.resolution, d.channels)
    if d.dataset == "parquet":
        return PILDataset(ParquetImages(d.path), d.resolution, d.channels)
    raise DatasetError(f"unknown data.dataset {d.dataset!r}")


def random_items(dataset: Dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of ``n`` items (all, if fewer) in a random order fixed by ``seed``."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def random_images(dataset: Dataset, n: int, seed: int = 0) -> torch.Tensor:
    """The images of ``n`` items (all, if fewer) in a random order fixed by ``seed``."""
    return random_items(dataset, n, seed)[0]


def check_data_available(cfg: Config) -> None:
    """Open the dataset once in the driver so a missing folder fails before any worker starts."""
    ds = build_dataset(cfg)
    if len(ds) < cfg.ray.num_workers:
        raise DatasetError(f"dataset {cfg.data.dataset!r} has {len(ds)} samples, fewer than ray.num_workers")
    ds[0]


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


# ----------------------------------------------------------------------------------------------------------------
# Conversion to parquet shards


def write_parquet_shards(dataset: Dataset, out_dir: str, shard_size: int = 10000, progress: bool = False) -> list[Path]:
    """Encode every (image in [-1, 1], label) of ``dataset`` as PNG bytes into numbered parquet shards;
    ``progress``: show progress over the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .progress import progress as show_progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, images, labels = [], [], []

    def flush():
        path = out / f"shard-{len(paths):05d}.parquet"
        table = pa.table({"image": pa.array(images, type=pa.binary()), "label": pa.array(labels, type=pa.int64())})
        pq.write_table(table, path)
        paths.append(path)
        images.clear()
        labels.clear()

    for i in show_progress(range(len(dataset)), desc="dataset convert", unit="images", enabled=progress):
        x, y = dataset[i]
        if x.dim() != 3:
            raise DatasetError("only image datasets can be converted to parquet shards")
        arr = unit_to_uint8(x).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
        images.append(buf.getvalue())
        labels.append(int(y))
        if len(images) == shard_size:
            flush()
    if images:
        flush()
    return paths
