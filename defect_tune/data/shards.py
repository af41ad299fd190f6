"""Reading `prepare`'s output for training: meta.json, split arrays, tensors, sampling weights.

Plain PyTorch and pyarrow; the Ray layer reads the same shards through Ray Data and uses the
same `to_tensor` and `sample_weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from defect_tune.core.errors import UserError

if TYPE_CHECKING:
    import torch

# timm's grayscale statistics (ImageNet's RGB means and stds averaged), so pretrained stems and
# networks trained from scratch see inputs on the same scale.
MEAN, STD = 0.449, 0.226


class DataError(UserError):
    """Prepared data that cannot be used; the message names the file."""


def data_location(data: str | os.PathLike) -> str:
    """Where prepared data lives, as every node of a cluster reads it: a local (or shared) path made
    absolute, or a URI that pyarrow and Ray Data open (s3://, gs://, hdfs://, file://) as given."""
    text = os.fspath(data)
    return text if "://" in text else str(Path(text).absolute())


def data_file(location: str, name: str) -> str:
    """A file of the prepared data: a path, or a URI when the data is one."""
    return f"{location.rstrip('/')}/{name}" if "://" in location else str(Path(location) / name)


def filesystem_for(location: str) -> tuple[pafs.FileSystem | None, str]:
    """pyarrow's filesystem for a URI and the path within it; (None, path) for a local path."""
    if "://" not in location:
        return None, location
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as error:  # unknown scheme, missing credentials, ...
        raise DataError(f"{location}: cannot open: {error}") from None
    return filesystem, path.rstrip("/")


def read_meta(data_dir: str | os.PathLike) -> dict:
    location = data_location(data_dir)
    path = data_file(location, "meta.json")
    filesystem, root = filesystem_for(location)
    try:
        if filesystem is None:
            text = Path(path).read_text()
        else:
            with filesystem.open_input_stream(f"{root}/meta.json") as stream:
                text = stream.read().decode()
        meta = json.loads(text)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `defect-tune prepare` first") from None
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}; not a `defect-tune prepare` "
                        "output")
    for key in ("classes", "image", "splits"):
        if key not in meta:
            raise DataError(f"{path}: missing {key!r}; not a `defect-tune prepare` output")
    classes, image = meta["classes"], meta["image"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise DataError(f"{path}: 'classes' must be a list of distinct class names")
    sizes = [image.get(key) for key in ("height", "width")] if isinstance(image, dict) else [None]
    if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
        raise DataError(f"{path}: 'image' needs a positive integer 'height' and 'width'")
    if not isinstance(meta["splits"], dict):
        raise DataError(f"{path}: 'splits' must be an object of split -> shards")
    for split, entry in meta["splits"].items():
        for shard in (entry or {}).get("shards", []) if isinstance(entry, dict) else []:
            name = shard.get("file") if isinstance(shard, dict) else None
            # A shard is read from the data folder only: a meta.json naming /etc/x or ../x is refused.
            if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in PurePosixPath(name).parts:
                raise DataError(f"{path}: {split} shard {name!r} is not a file inside the data folder")
    return meta


SHARD_COLUMNS = ("id", "pixels", "labels")


def check_shards(data_dir: str | os.PathLike, meta: dict, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Every shard meta.json lists is there, whole (its sha256), a Parquet file with the columns
    training reads and the row count meta.json says. Run before any trial starts: a bad shard
    found by a Ray Data task mid-sweep fails trials one by one with a worse message."""
    location = data_location(data_dir)
    filesystem, root = filesystem_for(location)
    meta_file = data_file(location, "meta.json")
    for split in splits:
        entry = meta["splits"].get(split)
        if entry is None:
            raise DataError(f"{meta_file}: no {split!r} split")
        positives = entry.get("positives") if isinstance(entry, dict) else None
        if split == "val" and isinstance(positives, dict) and positives and not any(positives.values()):
            # The objective, the thresholds and early stopping all rank on validation defects.
            raise DataError(f"{meta_file}: the val split holds no image with a defect, so nothing can be ranked "
                            "on it; prepare with a larger validation fraction (--split)")
        shards = entry.get("shards", [])
        rows = 0
        for shard in shards:
            name = data_file(location, shard["file"])
            path = f"{root}/{shard['file']}"
            try:
                if filesystem is None:
                    data = Path(path).read_bytes()
                else:
                    with filesystem.open_input_stream(path) as stream:
                        data = stream.read()
            except FileNotFoundError:
                raise DataError(f"{name}: not found, but {meta_file} lists it") from None
            except (OSError, pa.ArrowException) as error:
                raise DataError(f"{name}: cannot read: {error}") from None
            if "sha256" in shard and hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise DataError(f"{name}: content differs from what {meta_file} recorded (sha256); the shard is "
                                "corrupt or from another `prepare` run: prepare again")
            try:
                parquet = pq.ParquetFile(pa.BufferReader(data))
            except (OSError, pa.ArrowException) as error:
                raise DataError(f"{name}: not a readable Parquet file: {error}") from None
            missing = [c for c in SHARD_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise DataError(f"{name}: missing column(s) {missing}; not a `defect-tune prepare` shard")
            if "rows" in shard and parquet.metadata.num_rows != shard["rows"]:
                raise DataError(f"{name}: holds {parquet.metadata.num_rows} rows, {meta_file} says {shard['rows']}")
            _check_shard_content(name, parquet, meta, meta_file)
            rows += parquet.metadata.num_rows
        if rows != entry.get("images", rows):
            raise DataError(f"{meta_file}: split {split!r} has {entry['images']} images, its shards hold {rows} rows")


def _check_shard_content(name: str, parquet: pq.ParquetFile, meta: dict, meta_file: str) -> None:
    """The shard's images have meta.json's shape and its labels are 0/1, one per class. A
    meta.json saying 16x64 for 32x32 shards holds the same pixel count, and training would read
    every image scrambled."""
    height, width, classes = meta["image"]["height"], meta["image"]["width"], len(meta["classes"])
    names = parquet.schema_arrow.names
    if "height" in names and "width" in names:  # prepare writes both; each image's own shape
        table = parquet.read(columns=["height", "width"])
        shapes = {(h, w) for h, w in zip(table.column("height").to_pylist(), table.column("width").to_pylist())}
        if shapes - {(height, width)}:
            found = ", ".join(f"{h}x{w}" for h, w in sorted(shapes, key=str)[:3])
            raise DataError(f"{name}: holds images of {found}, {meta_file} says {height}x{width}; "
                            "meta.json does not belong to these shards: prepare again")
    else:
        lengths = pa.compute.binary_length(parquet.read(columns=["pixels"]).column("pixels"))
        if len(lengths) and pa.compute.min_max(lengths).as_py() != {"min": height * width, "max": height * width}:
            raise DataError(f"{name}: an image's pixel count is not {height}x{width} as {meta_file} says")
    labels = parquet.read(columns=["labels"]).column("labels").combine_chunks()
    if labels.null_count:
        raise DataError(f"{name}: {labels.null_count} row(s) have no labels; not a `defect-tune prepare` shard")
    widths = set(pa.compute.list_value_length(labels).to_pylist()) if len(labels) else set()
    if widths - {classes}:
        raise DataError(f"{name}: its labels have {sorted(widths)[0]} columns, {meta_file} lists {classes} classes; "
                        "meta.json does not belong to these shards")
    values = set(np.unique(labels.flatten().to_numpy(zero_copy_only=False)).tolist()) if len(labels) else set()
    if values - {0, 1}:
        raise DataError(f"{name}: holds label value(s) {sorted(values - {0, 1})}; a label is 0 (absent) or 1 (present)")


def load_split(data_dir: str | os.PathLike, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a split as (N, H, W) uint8, labels (N, C) float32, and ids."""
    location = data_location(data_dir)
    filesystem, root = filesystem_for(location)
    files = [shard["file"] for shard in meta["splits"][split]["shards"]]
    shards = [f"{root}/{name}" for name in files]
    height, width, classes = meta["image"]["height"], meta["image"]["width"], len(meta["classes"])
    if not shards:
        return np.zeros((0, height, width), np.uint8), np.zeros((0, classes), np.float32), []
    try:
        table = pq.read_table(shards, columns=["id", "pixels", "labels"], filesystem=filesystem)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{data_dir}/{split}: cannot read shards: {error}") from None
    expected = meta["splits"][split]["images"]
    if table.num_rows != expected:
        raise DataError(f"{data_dir}/{split}: shards hold {table.num_rows} rows, meta.json says {expected}")
    pixels = table.column("pixels").to_pylist()
    if any(len(p) != height * width for p in pixels):
        raise DataError(f"{data_dir}/{split}: an image's pixel count is not {height}x{width} as meta.json says")
    images = np.frombuffer(bytearray(b"".join(pixels)), np.uint8).reshape(-1, height, width)  # writable
    rows = table.column("labels").to_pylist()
    if any(len(row) != classes for row in rows):
        raise DataError(f"{data_dir}/{split}: the shards' labels have {len(rows[0]) if rows else 0} columns, "
                        f"meta.json lists {classes} classes; meta.json does not belong to these shards")
    labels = np.array(rows, dtype=np.float32).reshape(-1, classes)
    return images, labels, table.column("id").to_pylist()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 to normalised (N, 1, H, W) float32."""
    import torch  # here, not at the top: Ray Data's task processes import this module and need no torch

    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
    return x.sub_(MEAN).div_(STD)


def sample_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-image draw weights that oversample rare classes: an image weighs as its rarest class,
    `(N / P_c) ** power`; defect-free images weigh 1. power 0 is uniform."""
    positives = labels.sum(axis=0)
    per_class = np.where(positives > 0, (len(labels) / np.maximum(positives, 1)) ** power, 1.0)
    weighted = np.where(labels > 0.5, per_class[None, :], 0.0).max(axis=1)
    return np.where(weighted > 0, weighted, 1.0)
