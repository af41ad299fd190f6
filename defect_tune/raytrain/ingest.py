"""The Ray Data side of a trial: the trial's own Datasets over `prepare`'s Parquet shards, decoded
(and, for sweeps, augmented) in `map_batches` tasks spread over the cluster.

Light on purpose: every Ray Data task process unpickles `_DecodeBatch` and so imports this module;
albumentations is imported only where a batch is augmented.
"""

from __future__ import annotations

import math

import numpy as np
import ray
import ray.data

from defect_tune.core.config import TrainConfig
from defect_tune.data.shards import data_file, data_location


def _decode(batch: dict, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer(b"".join(batch["pixels"]), np.uint8).reshape(-1, height, width)
    labels = np.stack([np.asarray(row, dtype=np.float32) for row in batch["labels"]])
    return images, labels


class _DecodeBatch:
    """map_batches body: stored bytes to uint8 images (augmented for training) and labels."""

    def __init__(self, height: int, width: int, augment: str | None, ids: np.ndarray | None = None,
                 keep_ids: bool = True):
        # ids: a cross-validation fold's held-out ids; its val keeps them, its train drops them.
        self.height, self.width, self.augment, self.ids, self.keep_ids = height, width, augment, ids, keep_ids

    def __call__(self, batch: dict) -> dict:
        if self.ids is not None:
            chosen = np.isin(batch["id"], self.ids) == self.keep_ids
            batch = {key: value[chosen] for key, value in batch.items()}
        images, labels = _decode(batch, self.height, self.width)
        if self.augment:
            # A fresh random stream per batch and epoch: Ray Data runs batches in any order on any
            # node, and a seed fixed per batch would give every epoch the same augmented views.
            # (So sweeps are not bit-reproducible; `defect-tune train` is.)
            seed = int(np.random.default_rng().integers(2**32))
            from defect_tune.data.augment import augment_batch, build_augmentation

            images = augment_batch(build_augmentation(self.augment, (self.height, self.width), seed), images)
        return {"image": images, "labels": labels}


def data_tasks_at_once(workers: int, cpus_per_worker: float) -> int:
    """Read or map tasks a run's Dataset keeps going at once: the CPUs its workers reserved, at
    least two (one reading ahead while one is consumed)."""
    return max(2, math.ceil(workers * cpus_per_worker))


def build_datasets(data_dir: str, meta: dict, config: TrainConfig, train_splits: tuple[str, ...] = ("train",),
                   validate: bool = True, reproducible: bool = False, tasks_at_once: int = 2,
                   worker_augments: bool = False) -> dict:
    """The run's Datasets: train (split across workers) and val (every worker whole).

    Sweeps augment in Ray Data, spread over the cluster, unless `worker_augments` (a worker that
    keeps its shard in memory augments what it kept). `reproducible` (production retraining)
    fixes the shard order and leaves augmentation to the worker, seeded per epoch: Ray Data runs
    batches on any node in any order, so a seed there cannot make two runs equal.

    Read and map tasks ask Ray for no CPU, and at most `tasks_at_once` of each run per Dataset.
    With the default whole CPU per task they wait until some CPU is free, and the training
    workers that wait on them hold every CPU as soon as the trials outnumber the free cores: after
    a node is lost, or with a `--max-concurrent` the cluster cannot hold. That waited forever,
    silently (https://github.com/ray-project/ray/issues/29662). Without a logical CPU they share
    the cores like any loader process; the cap keeps a trial's Data work near what it reserved.
    """
    height, width = meta["image"]["height"], meta["image"]["width"]
    location = data_location(data_dir)  # a path all nodes share, or a URI (s3://...) Ray Data opens
    # Ray Data 2.60's new Parquet reader lists files with a pool of up to 32 footer-reading actors
    # (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS) and again at every execution, so every epoch of every
    # trial: dozens of process starts, for a handful of shards whose footers the driver reads in
    # milliseconds. The classic reader does just that. (Each Dataset keeps the context it was made in.)
    ray.data.DataContext.get_current().use_datasource_v2 = False
    datasets = {}
    parts = [("train", train_splits, None if reproducible or worker_augments else config.augment)]
    if validate:
        parts.append(("val", ("val",), None))
    fold = meta.get("fold")  # a cross-validation fold (folds.py): both splits read train+val's shards
    held_out = None if fold is None else np.array(fold["val_ids"])
    for name, splits, augment in parts:
        files = list(dict.fromkeys(data_file(location, shard["file"])
                                   for split in splits for shard in meta["splits"][split]["shards"]))
        columns = ["pixels", "labels"] + (["id"] if fold is not None else [])
        ds = ray.data.read_parquet(files, columns=columns, num_cpus=0, concurrency=tasks_at_once)
        if name == "train":
            # A new shard order every epoch; a fixed one when the run must be reproducible.
            ds = ds.randomize_block_order(seed=config.seed if reproducible else None)
        prepare = _DecodeBatch(height, width, augment, ids=held_out, keep_ids=name == "val")
        datasets[name] = ds.map_batches(prepare, batch_format="numpy", batch_size=256,
                                        num_cpus=0, concurrency=tasks_at_once)
    return datasets
