"""Small datasets written by the tests themselves, in the real on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path

# No model hub here or in CI: fail at once instead of retrying the network for most of a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
NEU_DET = SHARED_DATASETS / "neu-det"

needs_neu_det = pytest.mark.skipif(
    not (NEU_DET / "Annotations").is_dir(),
    reason=f"real NEU-DET data not found at {NEU_DET} (the shared datasets folder is absent)",
)


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 24), mode: str = "L") -> Path:
    """A distinct random image (so content hashes differ unless a test wants duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int]]], size=(24, 24)) -> str:
    parts = [f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>"]
    parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>1</depth></size>")
    for name, (xmin, ymin, xmax, ymax) in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def make_voc(root: Path, labels: dict[str, list[str]], with_extension: bool = True, size=(24, 24)) -> Path:
    """A VOC folder: `labels` maps image stem -> class names (empty list: defect-free)."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for seed, (stem, names) in enumerate(labels.items()):
        write_image(root / "JPEGImages" / f"{stem}.jpg", seed, size)
        filename = f"{stem}.jpg" if with_extension else stem
        objects = [(name, (2, 2, size[1] - 2, size[0] - 2)) for name in names]
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(filename, objects, size))
    return root


def balanced_labels(classes: list[str], per_class: int, multi_every: int = 0) -> dict[str, list[str]]:
    """per_class single-label images per class; every `multi_every`-th also carries the next class."""
    labels = {}
    for ci, name in enumerate(classes):
        for k in range(per_class):
            extra = [classes[(ci + 1) % len(classes)]] if multi_every and k % multi_every == 0 else []
            labels[f"{name}_{k:03d}"] = [name, *extra]
    return labels


@pytest.fixture
def small_voc(tmp_path: Path) -> Path:
    labels = balanced_labels(["crack", "dark_area", "scratch"], per_class=12, multi_every=4)
    labels.update({f"clean_{k}": [] for k in range(6)})
    return make_voc(tmp_path / "voc", labels)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """The embedded default, small: 400 synthetic EL cells at 32 px, prepared once per session."""
    from defect_tune.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("synthetic")
    prepare(PrepareOptions(source=root / "voc", format="synthetic", out=root / "data", image_size=32,
                           synthetic_images=400, synthetic_imbalance=10, workers=1))
    return root / "data"


def read_csv(source, **options) -> pd.DataFrame:
    """A leaderboard or progress.csv as written: Tune's trial ids are hex, and pandas reads one
    like `161137e0` as the number 161137.0."""
    return pd.read_csv(source, dtype={"trial_id": str}, **options)
