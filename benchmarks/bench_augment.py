"""How many images per second one CPU core augments for a worker that keeps its train shard, per
preset and per transform, and so how many cores it takes to keep a GPU's training fed.

    python benchmarks/bench_augment.py [--data DIR] [--epochs 3] [--gpu-rate 11465]
                                       [--write results/benchmarks/augment.md]

A worker whose shard fits `--keep-train-gb` runs every epoch after its first from memory,
augmenting each batch itself, image by image, with albumentations (`engine.memory_batches`, the
code measured here), then normalising it into a float tensor. That work is on the worker's CPU
while its GPU waits. This process is pinned to one core, so the figures are per core whatever
threads OpenCV or torch would start; each setting runs `--epochs` passes over the train split,
the settings alternating pass by pass, and the median pass counts.

`--gpu-rate`: the images/s the GPU trains at, against which the cores needed are counted; by
default the H200's plain loop for resnet18 at 224 px from issue 9 (11,465/s, bf16).
Default data: NEU-DET at 224 px prepared from ../shared/datasets when present, else the
synthetic set at 64 px.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit, machine, neu_det_or_synthetic

from defect_tune.core.augment_spec import PRESETS
from defect_tune.core.config import TrainConfig
from defect_tune.data.augment import TRANSFORMS, build_augmentation
from defect_tune.data.shards import load_split, read_meta
from defect_tune.training.engine import memory_batches

BATCH = 64


def one_pass(images: np.ndarray, labels: np.ndarray, spec: str, seed: int) -> float:
    """Images/s of one pass over the kept shard with augmentation `spec`."""
    pipeline = build_augmentation(spec, images.shape[1:], seed)
    started = time.perf_counter()
    config = TrainConfig(batch_size=BATCH, pretrained=False)
    for _ in memory_batches(images, labels, config, False, np.random.default_rng(seed), pipeline):
        pass
    return len(labels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gpu-rate", type=float, default=11_465.0)
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dt-augment-") as tmp:
        data, described = neu_det_or_synthetic(args.data, Path(tmp))
        images, labels, _ = load_split(data, "train", read_meta(data))

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, whatever threads libraries start
    import torch

    torch.set_num_threads(1)
    settings = [*PRESETS, *(name for name in TRANSFORMS if name not in PRESETS["light"])]
    rates: dict[str, list[float]] = {spec: [] for spec in settings}
    one_pass(images, labels, "heavy", 0)  # warm-up: imports, OpenCV's first calls
    for epoch in range(args.epochs):
        for spec in settings:
            rates[spec].append(one_pass(images, labels, spec, epoch))

    def row(spec: str, *cells: str) -> str:
        rate = statistics.median(rates[spec])
        return f"| {' | '.join([spec, *cells])} | {rate:,.0f} | {args.gpu_rate / rate:.1f} |"

    lines = [
        "# Augmenting a kept train shard: images/s per CPU core",
        "",
        machine(),
        f"Command: `{' '.join(['python', 'benchmarks/bench_augment.py', *sys.argv[1:]])}`",
        f"Data: {described}, train split ({len(labels)} images, {images.shape[1]}x{images.shape[2]}); batches of "
        f"{BATCH}, this process pinned to one core; median of {args.epochs} passes, settings alternating.",
        "",
        f"| setting | transforms | images/s per core | cores to feed {args.gpu_rate:,.0f} images/s |",
        "|---|---|---:|---:|",
        *(row(spec, " + ".join(PRESETS[spec]) or "(normalising only)") for spec in PRESETS),
        "",
        "Each transform alone, at its preset probability (`augment.TRANSFORMS`):",
        "",
        "| transform | images/s per core | cores |",
        "|---|---:|---:|",
        *(row(spec) for spec in settings if spec not in PRESETS),
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
