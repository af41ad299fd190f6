"""Reading `prepare`'s output for training: meta.json, split arrays, tensors, sampling weights.

Plain PyTorch and pyarrow; the Ray layer reads the same shards through Ray Data and uses the
same `to_tensor` and `sample_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

# timm's grayscale statistics (ImageNet's RGB means and stds averaged), so pretrained stems and
# networks trained from scratch see inputs on the same scale.
MEAN, STD = 0.449, 0.226


class DataError(ValueError):
    """Prepared data that cannot be used; the message names the file."""


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `defect-tune prepare` first") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    for key in ("classes", "image", "splits"):
        if key not in meta:
            raise DataError(f"{path}: missing {key!r}; not a `defect-tune prepare` output")
    return meta


def load_split(data_dir: Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a split as (N, H, W) uint8, labels (N, C) float32, and ids."""
    shards = [Path(data_dir) / shard["file"] for shard in meta["splits"][split]["shards"]]
    height, width, classes = meta["image"]["height"], meta["image"]["width"], len(meta["classes"])
    if not shards:
        return np.zeros((0, height, width), np.uint8), np.zeros((0, classes), np.float32), []
    try:
        table = pq.read_table(shards, columns=["id", "pixels", "labels"])
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{data_dir}/{split}: cannot read shards: {error}") from None
    expected = meta["splits"][split]["images"]
    if table.num_rows != expected:
        raise DataError(f"{data_dir}/{split}: shards hold {table.num_rows} rows, meta.json says {expected}")
    pixels = table.column("pixels").to_pylist()
    if any(len(p) != height * width for p in pixels):
        raise DataError(f"{data_dir}/{split}: an image's pixel count is not {height}x{width} as meta.json says")
    images = np.frombuffer(bytearray(b"".join(pixels)), np.uint8).reshape(-1, height, width)  # writable
    labels = np.array(table.column("labels").to_pylist(), dtype=np.float32).reshape(-1, classes)
    return images, labels, table.column("id").to_pylist()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 to normalised (N, 1, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
    return x.sub_(MEAN).div_(STD)


def sample_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-image draw weights that oversample rare classes: an image weighs as its rarest class,
    `(N / P_c) ** power`; defect-free images weigh 1. power 0 is uniform."""
    positives = labels.sum(axis=0)
    per_class = np.where(positives > 0, (len(labels) / np.maximum(positives, 1)) ** power, 1.0)
    weighted = np.where(labels > 0.5, per_class[None, :], 0.0).max(axis=1)
    return np.where(weighted > 0, weighted, 1.0)
