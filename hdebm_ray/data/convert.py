"""``hdebm-ray dataset convert``: any dataset of images -> numbered parquet shards of PNG bytes, to a local folder
or a pyarrow filesystem URI, in bounded memory.

The source is read one item at a time and each shard is written a row group of 1024 rows at a time, so memory
holds one row group's encoded bytes whatever the dataset's (and the shard's) size. A shard is written under a
temporary name and renamed when complete, so a killed conversion never leaves a truncated ``*.parquet`` that a
reader would take for data. An output folder that already holds shards is refused unless ``overwrite``, which
removes the old shards first (two conversions into one folder would otherwise mix two datasets).

The rows are written in a random order (seeded) unless ``shuffle=False``: an image folder lists its files class
by class, and shards of one or two classes each would make every training batch nearly single-class, since the
readers shuffle shards and rows within a buffer, not rows across the whole dataset. (A parquet source is read in
storage order whatever ``shuffle`` says: random row access there would read a row group per row.)

Columns: ``image`` (PNG bytes), ``label`` (int64, -1 when the source has none) and ``index`` (the item's position
in the source).
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..io.storage import fs_and_path, is_uri
from ..progress import progress as show_progress
from .datasets import iter_batches, unit_to_uint8
from .files import DatasetError, ParquetImages

TMP_SUFFIX = ".parquet.tmp"
ROWS_PER_GROUP = 1024  # parquet row group: the unit random access reads, and what convert holds at once


class OutputExists(DatasetError):
    """The output folder already holds shards and ``--overwrite`` was not given."""


def _location(path: str) -> str:
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def check_not_inside(source: str | None, out: str) -> None:
    """Refuse an output folder that is the source folder, or inside it, or holds it (``--overwrite`` would
    delete the source before it is read, or the shards would be read back as images)."""
    if not source:
        return
    a, b = _location(source), _location(out)
    if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
        raise DatasetError(f"--out '{out}' and --in '{source}' overlap; write the shards to a separate folder")


def existing_outputs(fs: pafs.FileSystem, path: str) -> list[str]:
    """The shards (and leftover temporary shards) of an earlier conversion in ``path``."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"--out '{path}' exists and is not a folder")
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(e.path for e in entries if e.path.endswith((".parquet", TMP_SUFFIX)))


def prepare_output(out: str, overwrite: bool) -> tuple[pafs.FileSystem, str]:
    """The output folder, created; refuses one with shards unless ``overwrite`` (then removes them)."""
    try:
        fs, path = fs_and_path(out)
        old = existing_outputs(fs, path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"--out '{out}' cannot be opened: {e}") from None
    if old and not overwrite:
        raise OutputExists(
            f"--out '{out}' already holds {len(old)} parquet shard(s); pass --overwrite to replace them, or choose "
            f"an empty folder"
        )
    for p in old:
        fs.delete_file(p)
    fs.create_dir(path, recursive=True)
    return fs, path.rstrip("/")


def png_bytes(x) -> bytes:
    """An image in [-1, 1] (C×H×W) as PNG bytes (grey stays one channel)."""
    arr = unit_to_uint8(x).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet_shards(
    dataset,
    out: str,
    shard_size: int = 10000,
    progress: bool = False,
    overwrite: bool = False,
    shuffle: bool = True,
    seed: int = 0,
) -> list[str]:
    """Encode every (image in [-1, 1], label) of ``dataset`` into ``out``/shard-NNNNN.parquet, ``shard_size`` rows
    each, in a random order fixed by ``seed`` (``shuffle``); returns the shards' paths. ``progress``: show
    progress over the images."""

    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1 (got {shard_size})")
    fs, path = prepare_output(out, overwrite)
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
    written: list[str] = []
    rows: dict[str, list] = {"image": [], "label": [], "index": []}
    shard = {"writer": None, "stream": None, "rows": 0}

    def write_group():  # a row group at a time: memory holds one group's bytes, not a shard's
        if shard["writer"] is None:
            shard["stream"] = fs.open_output_stream(f"{path}/shard-{len(written):05d}{TMP_SUFFIX}")
            shard["writer"] = pq.ParquetWriter(shard["stream"], schema)
        shard["writer"].write_table(pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in rows.items()}))
        shard["rows"] += len(rows["image"])
        for column in rows.values():
            column.clear()

    def close_shard():
        shard["writer"].close()
        shard["stream"].close()
        name = f"{path}/shard-{len(written):05d}"
        fs.move(name + TMP_SUFFIX, name + ".parquet")
        written.append(name + ".parquet")
        shard.update(writer=None, stream=None, rows=0)

    for x, y, index in items_in_order(dataset, shuffle and not isinstance(dataset, ParquetImages), seed, progress):
        if x.dim() != 3:
            raise DatasetError("only image datasets can be converted to parquet shards")
        rows["image"].append(png_bytes(x))
        rows["label"].append(int(y))
        rows["index"].append(index)
        if len(rows["image"]) == min(ROWS_PER_GROUP, shard_size - shard["rows"]):
            write_group()
        if shard["rows"] == shard_size:
            close_shard()
    if rows["image"]:
        write_group()
    if shard["writer"] is not None:
        close_shard()
    return written


def items_in_order(dataset, shuffle: bool, seed: int, progress: bool):
    """(image, label, position in the source), in a random order fixed by ``seed`` or in storage order."""
    if not shuffle:
        index = 0
        for x, y in iter_batches(dataset, 256, progress="dataset convert" if progress else None):
            for image, label in zip(x, y.tolist(), strict=True):
                yield image, label, index
                index += 1
        return
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    for i in show_progress(order, desc="dataset convert", unit="images", enabled=progress):
        x, y = dataset[i]
        yield x, int(y), i
