"""Images/s delivered to a training loop from `prepare`'s Parquet shards: Ray Data (as a trial
builds it, with and without augmentation) vs a torch DataLoader over the same shards vs tensors
already in memory.

    python benchmarks/bench_ingest.py [--data DIR] [--epochs 3] [--write results/benchmarks/ingest.md]

Every variant runs in this one invocation, alternating epoch by epoch, and delivers normalised
(N, 1, H, W) float tensors and labels in batches of 64, as the worker loop consumes them; the
consumer does nothing else, so the figures are the ingest ceilings. Ray Data runs on a local
Ray cluster started here with all the machine's CPUs. Default data: NEU-DET at 224 px prepared
from ../shared/datasets when present, else the synthetic set at 64 px.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import emit, machine, neu_det_or_synthetic

from defect_tune.core.config import load_config
from defect_tune.data.shards import data_file, load_split, read_meta, to_tensor
from defect_tune.raytrain.ingest import build_datasets

BATCH = 64


class ShardImages(torch.utils.data.Dataset):
    """A plain PyTorch Dataset over the same shards: rows read with pyarrow, decoded per item."""

    def __init__(self, data: Path, meta: dict, split: str):
        files = [data_file(str(data), s["file"]) for s in meta["splits"][split]["shards"]]
        table = pq.read_table(files, columns=["pixels", "labels"])
        self.pixels, self.labels = table.column("pixels").to_pylist(), table.column("labels").to_pylist()
        self.shape = (meta["image"]["height"], meta["image"]["width"])

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i):
        return np.frombuffer(self.pixels[i], np.uint8).reshape(self.shape), np.asarray(self.labels[i], np.float32)


def _collate(items):
    images, labels = zip(*items)
    return to_tensor(np.stack(images)), torch.from_numpy(np.stack(labels))


def epoch_in_memory(x: torch.Tensor, y: torch.Tensor) -> int:
    order = torch.randperm(len(x))
    seen = 0
    for start in range(0, len(x), BATCH):
        index = order[start:start + BATCH]
        batch, _ = x[index], y[index]  # the gather a shuffled in-memory loop pays
        seen += len(batch)
    return seen


def epoch_loader(loader) -> int:
    return sum(len(x) for x, _ in loader)


def epoch_ray(dataset) -> int:
    seen = 0
    for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy", local_shuffle_buffer_size=4 * BATCH):
        x = to_tensor(batch["image"])
        torch.from_numpy(np.ascontiguousarray(batch["labels"]))
        seen += len(x)
    return seen


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dt-ingest-") as tmp:
        data, described = neu_det_or_synthetic(args.data, Path(tmp))
        meta = read_meta(data)
        images = meta["splits"]["train"]["images"]
        x_uint8, y, _ = load_split(data, "train", meta)
        x = to_tensor(x_uint8)
        loaders = {
            workers: torch.utils.data.DataLoader(ShardImages(data, meta, "train"), batch_size=BATCH, shuffle=True,
                                                 collate_fn=_collate, num_workers=workers,
                                                 persistent_workers=workers > 0)
            for workers in (0, os.cpu_count())
        }
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            ray_sets = {augment: build_datasets(str(data), meta, load_config(None, {"augment": augment}),
                                                validate=False)["train"]
                        for augment in ("none", "light", "standard")}
            variants = {
                "tensors in memory (upper bound)": lambda: epoch_in_memory(x, torch.from_numpy(y)),
                "torch DataLoader over the shards, 0 workers": lambda: epoch_loader(loaders[0]),
                f"torch DataLoader over the shards, {os.cpu_count()} workers":
                    lambda: epoch_loader(loaders[os.cpu_count()]),
                **{f"Ray Data, augment {augment}": (lambda ds=ds: epoch_ray(ds)) for augment, ds in ray_sets.items()},
            }
            for run in variants.values():  # warm-up: imports, worker processes, Ray Data's first plan
                run()
            seconds = {name: [] for name in variants}
            for _ in range(args.epochs):
                for name, run in variants.items():
                    started = time.perf_counter()
                    assert run() == images, name
                    seconds[name].append(time.perf_counter() - started)
        finally:
            ray.shutdown()

    rates = {name: images / min(times) for name, times in seconds.items()}
    baseline = rates["torch DataLoader over the shards, 0 workers"]
    lines = [
        f"# Ingest: images/s delivered to the training loop, {described}, {images} training images",
        "",
        f"{machine()} Best of {args.epochs} epochs per variant, variants alternating in one run, batches of {BATCH}.",
        f"Command: `python benchmarks/bench_ingest.py{' --write ' + str(args.write) if args.write else ''}`",
        "",
        "| variant | images/s | ratio to DataLoader, 0 workers |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:,.0f} | {rate / baseline:.2f} |" for name, rate in rates.items()),
        "",
        "Ray Data rows are what a trial's worker gets from `get_dataset_shard` (read_parquet, decode and "
        "augmentation in map_batches tasks, a local shuffle buffer); the DataLoader reads the same shards "
        "with pyarrow and decodes per item, without augmentation.",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
