"""Image datasets that live in files: a folder tree of images, or parquet shards of encoded images, on a local
disk or behind any pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``).

Nothing here holds the dataset in memory. Both classes list their files once (parquet: each shard's row count,
from its footer) and read on demand: ``iter_batches`` streams the items in storage order in batches (what the FID
reference, the p0 fit and ``dataset convert`` read, in bounded memory), ``__getitem__`` reads one item (the
parquet row group it lies in is kept in a small byte-bounded cache), and ``take`` reads a given set of items by
one pass over the files they lie in. The same ``decode_image`` turns bytes into a [-1, 1] tensor here and in the
Ray Data ingestion (``distributed.ray_data``), so both paths see the same pixels; a file or row that cannot be
decoded is named in the error.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io.storage import fs_and_path, is_uri

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ROW_GROUP_CACHE_BYTES = 256 << 20  # parquet row groups kept for random access (``ParquetImages.__getitem__``)


class DatasetError(RuntimeError):
    """The dataset cannot be read; the message says which file or folder and what to do."""


class BadImageError(DatasetError):
    """One image's bytes do not decode (truncated, not an image): what ``data.on_bad_image: skip`` skips. A file or
    shard that cannot be read at all stays a ``DatasetError``: storage trouble is not skipped silently."""


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (…, C, H, W) in [0, 255] -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def pil_to_uint8(img: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """Centre-crop to a square, resize (bicubic, antialiased), shape (C, R, R) uint8."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)


def pil_to_unit(img: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """``pil_to_uint8`` mapped to [-1, 1]."""
    return uint8_to_unit(pil_to_uint8(img, resolution, channels))


def decode_uint8(data: bytes, resolution: int, channels: int, where: str) -> torch.Tensor:
    """Encoded image bytes -> (C, R, R) uint8; ``where`` names the file / shard row in the error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return pil_to_uint8(img, resolution, channels)
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:  # truncated / not an image / not bytes
        raise BadImageError(f"cannot decode the image in {where}: {e}") from None


def encoded_image_type(t: pa.DataType) -> bool:
    """Whether a parquet column of type ``t`` holds what ``image_bytes`` reads."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return encoded_image_type(t.field("bytes").type)
    return False


def image_bytes(cell) -> bytes:
    """A parquet ``image`` cell: encoded bytes, or a struct with a ``bytes`` field (as Hugging Face writes it)."""
    return cell["bytes"] if isinstance(cell, dict) else cell


def decode_image(data: bytes, resolution: int, channels: int, where: str) -> torch.Tensor:
    """``decode_uint8`` mapped to [-1, 1]."""
    return uint8_to_unit(decode_uint8(data, resolution, channels, where))


def open_root(root: str, what: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a dataset root (local path or URI), which must be a folder."""
    try:
        # a local path absolute: Ray Data's tasks may run in another working directory (or on another node)
        fs, path = fs_and_path(root if is_uri(root) else str(Path(root).expanduser().resolve()))
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:  # unknown scheme, no credentials, unreachable endpoint
        raise DatasetError(f"{what} '{root}' (data.path) cannot be opened: {e}") from None
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"{what} '{root}' (data.path) does not exist or is not a folder")
    return fs, path.rstrip("/")


def list_files(fs: pafs.FileSystem, path: str, suffixes: tuple[str, ...]) -> tuple[list[str], str]:
    """The files below ``path`` ending in ``suffixes`` (sorted), and their fingerprint: a hash of every file's
    path, size and modification time, which keys the caches derived from them (so a ``dataset convert
    --overwrite`` into the same folder, or an added image, invalidates them)."""
    selector = pafs.FileSelector(path, recursive=True)
    infos = sorted(
        (i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File and i.path.lower().endswith(suffixes)),
        key=lambda i: i.path,
    )
    digest = hashlib.sha1()
    for i in infos:
        digest.update(f"{i.path[len(path) :]}\0{i.size}\0{i.mtime_ns}\n".encode())
    return [i.path for i in infos], digest.hexdigest()[:12]


@contextmanager
def reading_shard(shard: str):
    """pyarrow's errors while reading ``shard`` (an OSError, or ArrowInvalid, a ValueError: a garbage file, or a
    shard truncated after its footer was read) as one DatasetError naming it."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise DatasetError(f"parquet shard '{shard}' cannot be read: {e}") from None


def class_folder(base: str, path: str) -> str | None:
    """The first-level folder below ``base`` that ``path`` lies in (its class), None for a file in ``base``."""
    parts = path[len(base) + 1 :].split("/")
    return parts[0] if len(parts) > 1 else None


def folder_label(base: str, path: str, index: dict[str, int]) -> int:
    """The label of an image file: its class folder's index, -1 outside any (or an unknown) class folder."""
    return index.get(class_folder(base, path), -1)


class BadImagePolicy:
    """``data.on_bad_image`` for the file datasets: ``fail`` raises the ``BadImageError`` that names the file;
    ``skip`` says so once per image (counting them in ``skipped``) and goes on without it."""

    on_bad_image = "fail"

    def decoded(self, i: int, decode, *args):
        """``decode(*args)``, or None where image ``i`` cannot be decoded and is skipped."""
        try:
            return decode(*args)
        except BadImageError as e:
            if self.on_bad_image != "skip":
                raise
            if i not in self.skipped:
                self.skipped.add(i)
                print(f"[data] skipping ({len(self.skipped)} so far, data.on_bad_image: skip): {e}", flush=True)
            return None

    @property
    def skipped(self) -> set[int]:
        if "_skipped" not in self.__dict__:
            self._skipped: set[int] = set()
        return self._skipped

    def first_good(self, i: int, decode_at):
        """Item ``i``, or under ``skip`` the next decodable one after it (random access keeps its batch full)."""
        for j in range(len(self)):
            k = (i + j) % len(self)
            if k not in self.skipped and (item := self.decoded(k, decode_at, k)) is not None:
                return item
        raise DatasetError(f"no image under '{self.root}' (data.path) can be decoded")


def _batches_of(items: Iterator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    xs, ys = [], []
    for x, y in items:
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)


class ImageFiles(BadImagePolicy, Dataset):
    """(image in [-1, 1], label) for every image file below ``root``; labels index the first-level folders
    (sorted), -1 for images directly in ``root``. Holds only the file list."""

    def __init__(self, root: str, resolution: int, channels: int):
        self.root, self.resolution, self.channels = root, resolution, channels
        self.fs, base = open_root(root, "image folder")
        self.base = base  # the root as the filesystem names it (labels are the first folder below)
        self.files, self.fingerprint = list_files(self.fs, base, IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetError(f"image folder '{root}' (data.path) holds no {'/'.join(IMAGE_SUFFIXES)} files")
        self.classes = sorted({c for c in (class_folder(base, f) for f in self.files) if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [folder_label(base, f, index) for f in self.files]

    def __len__(self):
        return len(self.files)

    def read(self, i: int) -> bytes:
        try:
            with self.fs.open_input_file(self.files[i]) as f:
                return f.read()
        except OSError as e:
            raise DatasetError(f"cannot read image file '{self.files[i]}': {e}") from None

    def _decode_at(self, i: int):
        return decode_image(self.read(i), self.resolution, self.channels, f"image file '{self.files[i]}'"), self.labels[
            i
        ]

    def __getitem__(self, i):
        return self.first_good(int(i), self._decode_at)

    def iter_batches(self, batch_size: int, indices=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The items (all, or ``indices`` in ascending order; skipped images left out) in batches."""
        order = range(len(self)) if indices is None else sorted(int(i) for i in indices)
        items = (self.decoded(i, self._decode_at, i) for i in order)
        return _batches_of((item for item in items if item is not None), batch_size)


class ParquetImages(BadImagePolicy, Dataset):
    """(image in [-1, 1], label) from every ``*.parquet`` shard below ``root``: column ``image`` (encoded bytes,
    or a struct with a ``bytes`` field as Hugging Face writes it), optional ``label`` (else -1). Holds the shard
    list and row counts; rows are read on demand."""

    def __init__(self, root: str, resolution: int, channels: int, cache_bytes: int = ROW_GROUP_CACHE_BYTES):
        self.root, self.resolution, self.channels = root, resolution, channels
        self.fs, base = open_root(root, "parquet folder")
        self.shards, self.fingerprint = list_files(self.fs, base, (".parquet",))
        if not self.shards:
            raise DatasetError(f"parquet folder '{root}' (data.path) holds no .parquet shards")
        self.group_rows: list[list[int]] = []  # rows of each row group, per shard
        self.columns: list[str] | None = None
        for shard in self.shards:
            with reading_shard(shard), self.fs.open_input_file(shard) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                names = schema.names
            if "image" not in names:
                raise DatasetError(f"parquet shard '{shard}' has no 'image' column (has {names})")
            if not encoded_image_type(schema.field("image").type):
                raise DatasetError(
                    f"parquet shard '{shard}': its 'image' column is {schema.field('image').type}, not encoded image "
                    "bytes (binary, or a struct with a binary 'bytes' field): write shards with `hdebm-ray dataset "
                    "convert`"
                )
            if self.columns is not None and ("label" in names) != ("label" in self.columns):
                raise DatasetError(
                    f"parquet shard '{shard}' {'has' if 'label' in names else 'lacks'} a 'label' column, unlike "
                    f"'{self.shards[0]}': every shard of a dataset needs the same columns"
                )
            self.columns = self.columns or names
            self.group_rows.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self.has_label = "label" in self.columns
        self.read_columns = ["image", "label"] if self.has_label else ["image"]
        self.shard_start = np.cumsum([0] + [sum(g) for g in self.group_rows])
        self.cache: OrderedDict[tuple[int, int], tuple[list, list]] = OrderedDict()
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def __len__(self):
        return int(self.shard_start[-1])

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """Item ``i`` -> (shard, row in shard, row group, row in group)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self.shard_start, i, side="right") - 1)
        row = i - int(self.shard_start[shard])
        starts = np.cumsum([0] + self.group_rows[shard])
        group = int(np.searchsorted(starts, row, side="right") - 1)
        return shard, row, group, row - int(starts[group])

    def _columns(self, table) -> tuple[list, list]:
        images = table.column("image").to_pylist()
        images = [image_bytes(im) for im in images]
        labels = table.column("label").to_pylist() if self.has_label else [-1] * len(images)
        return images, labels

    def _open(self, shard: int):
        return pq.ParquetFile(self.fs.open_input_file(self.shards[shard]))

    def _item(self, shard: int, row: int, image, label) -> tuple[torch.Tensor, int]:
        where = f"parquet shard '{self.shards[shard]}' row {row}"
        try:
            value = int(label) if label is not None and float(label).is_integer() else None
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise DatasetError(f"{where} has a null or non-integer label ({label!r})")
        return decode_image(image, self.resolution, self.channels, where), value

    def __getitem__(self, i):
        return self.first_good(int(i), self._decode_at)

    def _decode_at(self, i: int):
        shard, row, group, in_group = self.locate(i)
        key = (shard, group)
        if key not in self.cache:
            with reading_shard(self.shards[shard]):
                columns = self._columns(self._open(shard).read_row_group(group, columns=self.read_columns))
            size = sum(len(b) for b in columns[0] if b)
            while self.cache and self.cached_bytes + size > self.cache_bytes:
                _, (old, _) = self.cache.popitem(last=False)
                self.cached_bytes -= sum(len(b) for b in old if b)
            self.cache[key], self.cached_bytes = columns, self.cached_bytes + size
        self.cache.move_to_end(key)
        images, labels = self.cache[key]
        return self._item(shard, row, images[in_group], labels[in_group])

    def iter_rows(self, indices=None) -> Iterator[tuple[torch.Tensor, int]]:
        """Every item (or those of ``indices``, ascending), reading each shard once in record batches; with
        ``indices``, only the row groups that hold one."""
        wanted = None if indices is None else np.unique(np.asarray(list(indices), dtype=np.int64))
        cols = self.read_columns
        for shard in range(len(self.shards)):
            lo, hi = int(self.shard_start[shard]), int(self.shard_start[shard + 1])
            group_start = np.cumsum([0] + self.group_rows[shard])
            groups, keep = list(range(len(self.group_rows[shard]))), None
            if wanted is not None:
                rows = wanted[(wanted >= lo) & (wanted < hi)] - lo
                if not len(rows):
                    continue
                keep = set(rows.tolist())
                groups = sorted(set((np.searchsorted(group_start, rows, side="right") - 1).tolist()))
            with reading_shard(self.shards[shard]):
                reader = self._open(shard)
                for group in groups:
                    row = int(group_start[group])
                    for batch in reader.iter_batches(batch_size=1024, row_groups=[group], columns=cols):
                        images, labels = self._columns(batch)
                        for image, label in zip(images, labels, strict=True):
                            if keep is None or row in keep:
                                item = self.decoded(lo + row, self._item, shard, row, image, label)
                                if item is not None:
                                    yield item
                            row += 1

    def iter_batches(self, batch_size: int, indices=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The items (all, or ``indices`` in ascending order) in batches of ``batch_size``."""
        return _batches_of(self.iter_rows(indices), batch_size)
