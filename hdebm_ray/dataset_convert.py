"""``hdebm-ray dataset convert``: any dataset of images -> numbered parquet shards of PNG bytes, to a local folder
or a pyarrow filesystem URI, in bounded memory.

The source is read in storage order one batch at a time (``data.iter_batches``) and each shard is written as soon
as it is full, so memory holds one shard's encoded bytes whatever the dataset's size. A shard is written under a
temporary name and renamed when complete, so a killed conversion never leaves a truncated ``*.parquet`` that a
reader would take for data. An output folder that already holds shards is refused unless ``overwrite``, which
removes the old shards first (two conversions into one folder would otherwise mix two datasets).

Columns: ``image`` (PNG bytes), ``label`` (int64, -1 when the source has none) and ``index`` (the item's position
in the source, which names a row in errors even after a reader reshuffles the rows).
"""

from __future__ import annotations

import io

import pyarrow.fs as pafs
from PIL import Image

from .data import iter_batches, unit_to_uint8
from .data_files import DatasetError
from .storage import fs_and_path

TMP_SUFFIX = ".parquet.tmp"


class OutputExists(DatasetError):
    """The output folder already holds shards and ``--overwrite`` was not given."""


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
    dataset, out: str, shard_size: int = 10000, progress: bool = False, overwrite: bool = False
) -> list[str]:
    """Encode every (image in [-1, 1], label) of ``dataset`` into ``out``/shard-NNNNN.parquet, ``shard_size`` rows
    each; returns the shards' paths. ``progress``: show progress over the batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1 (got {shard_size})")
    fs, path = prepare_output(out, overwrite)
    written: list[str] = []
    rows: dict[str, list] = {"image": [], "label": [], "index": []}

    def flush():
        name = f"{path}/shard-{len(written):05d}"
        table = pa.table(
            {
                "image": pa.array(rows["image"], type=pa.binary()),
                "label": pa.array(rows["label"], type=pa.int64()),
                "index": pa.array(rows["index"], type=pa.int64()),
            }
        )
        with fs.open_output_stream(name + TMP_SUFFIX) as f:
            pq.write_table(table, f, row_group_size=1024)
        fs.move(name + TMP_SUFFIX, name + ".parquet")
        written.append(name + ".parquet")
        for column in rows.values():
            column.clear()

    index = 0
    for x, y in iter_batches(dataset, 256, progress="dataset convert" if progress else None):
        if x.dim() != 4:
            raise DatasetError("only image datasets can be converted to parquet shards")
        for image, label in zip(x, y.tolist(), strict=True):
            rows["image"].append(png_bytes(image))
            rows["label"].append(int(label))
            rows["index"].append(index)
            index += 1
            if len(rows["image"]) == shard_size:
                flush()
    if rows["image"]:
        flush()
    return written
