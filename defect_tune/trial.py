"""One search trial on Ray: the trial's own Ray Datasets, a TorchTrainer, and the worker loop.

Ray stays at the edges: the worker loop is the training core (`train.py`) plus
`get_dataset_shard` and `report`. Every trial builds its Datasets itself: one Dataset shared by
all trials leaked a CPU per trial that ASHA stopped and hung the sweep (see the project notes;
https://github.com/ray-project/ray/issues/54305 for the placement-group side).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from defect_tune.augment import augment_batch, build_augmentation
from defect_tune.config import TrainConfig
from defect_tune.data import to_tensor
from defect_tune.train import OBJECTIVE, EarlyStopping, build_parts, predict, score_epoch, seed_everything, train_one_epoch

CHECKPOINT_FILE = "model.pt"
PREDICTIONS_FILE = "val_predictions.npz"  # the epoch's validation probabilities, for reports


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares; travels to trials through `tune.with_parameters`."""

    data_dir: str
    meta: dict
    space: object  # SearchSpace
    storage_path: str
    sweep_name: str
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0


def _decode(batch: dict, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer(b"".join(batch["pixels"]), np.uint8).reshape(-1, height, width)
    labels = np.stack([np.asarray(row, dtype=np.float32) for row in batch["labels"]])
    return images, labels


class _Prepare:
    """map_batches body: stored bytes to uint8 images (augmented for training) and labels."""

    def __init__(self, height: int, width: int, augment: str | None):
        self.height, self.width, self.augment = height, width, augment

    def __call__(self, batch: dict) -> dict:
        images, labels = _decode(batch, self.height, self.width)
        if self.augment:
            # A fresh random stream per batch and epoch: Ray Data runs batches in any order on any
            # node, and a seed fixed per batch would give every epoch the same augmented views.
            # (So sweeps are not bit-reproducible; `defect-tune train` is.)
            seed = int(np.random.default_rng().integers(2**32))
            images = augment_batch(build_augmentation(self.augment, (self.height, self.width), seed), images)
        return {"image": images, "labels": labels}


def build_datasets(data_dir: str, meta: dict, config: TrainConfig, train_splits: tuple[str, ...] = ("train",),
                   validate: bool = True, reproducible: bool = False) -> dict:
    """The run's Datasets: train (split across workers) and val (every worker whole).

    Sweeps augment in Ray Data, spread over the cluster. `reproducible` (production retraining)
    fixes the shard order and leaves augmentation to the worker, seeded per epoch: Ray Data runs
    batches on any node in any order, so a seed there cannot make two runs equal.
    """
    height, width = meta["image"]["height"], meta["image"]["width"]
    datasets = {}
    parts = [("train", train_splits, None if reproducible else config.augment)]
    if validate:
        parts.append(("val", ("val",), None))
    for name, splits, augment in parts:
        files = [str(Path(data_dir) / shard["file"]) for split in splits for shard in meta["splits"][split]["shards"]]
        ds = ray.data.read_parquet(files, columns=["pixels", "labels"])
        if name == "train":
            # A new shard order every epoch; a fixed one when the run must be reproducible.
            ds = ds.randomize_block_order(seed=config.seed if reproducible else None)
        datasets[name] = ds.map_batches(_Prepare(height, width, augment), batch_format="numpy", batch_size=256)
    return datasets


def _batches(iterator, batch_size: int, drop_last: bool, shuffle: bool = False, seed: int | None = None, pipeline=None):
    buffer = 4 * batch_size if shuffle else None  # rows mix across shards within each epoch
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                       local_shuffle_buffer_size=buffer, local_shuffle_seed=seed if shuffle else None):
        images = batch["image"] if pipeline is None else augment_batch(pipeline, batch["image"])
        yield to_tensor(images), torch.from_numpy(np.ascontiguousarray(batch["labels"]))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ordinary training core plus three Ray calls (`prepare_model`, `get_dataset_shard`, `report`).

    loop_config: `config`, `meta`; for production retraining also `stop_after` (train this many
    epochs of a schedule laid out for `config.epochs`), `validate` (False: no val split, so no
    objective and no early stopping) and `reproducible` (augment here, seeded by epoch and rank).
    """
    config = TrainConfig.model_validate(loop_config["config"])
    meta = loop_config["meta"]
    stop_after = loop_config.get("stop_after", config.epochs)
    validate = loop_config.get("validate", True)
    reproducible = loop_config.get("reproducible", False)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(config.seed)  # same initial weights on every worker; DDP keeps them in step
    if reproducible:
        torch.use_deterministic_algorithms(True, warn_only=True)  # some CUDA kernels have no deterministic version
    train_images = sum(meta["splits"][split]["images"] for split in loop_config.get("train_splits", ("train",)))
    per_worker = train_images // world
    drop_last = per_worker > config.batch_size
    steps = max(per_worker // config.batch_size if drop_last else 1, 1)
    parts = build_parts(config, meta, steps, ray.train.torch.get_device())
    parts.net = ray.train.torch.prepare_model(
        parts.model, parallel_strategy_kwargs={"find_unused_parameters": config.freeze_epochs > 0}
    )
    stopper = EarlyStopping(config.early_stopping_patience)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried or resumed trial continues after its last epoch
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.scheduler is not None:
            parts.scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"]
        stopper.best, stopper.best_epoch, stopper.waited = state["best"], state["best_epoch"], state["waited"]
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val") if validate else None
    shape = (meta["image"]["height"], meta["image"]["width"])
    rng = np.random.default_rng(config.seed + rank)
    node = ray.get_runtime_context().get_node_id()
    for epoch in range(start, stop_after):
        pipeline = None
        if reproducible:
            pipeline = build_augmentation(config.augment, shape, config.seed + 1000 * epoch + rank)
        batches = _batches(train_shard, config.batch_size, drop_last, shuffle=True,
                           seed=config.seed + rank if reproducible else None, pipeline=pipeline)
        row = {"epoch": epoch + 1, **train_one_epoch(parts, config, batches, epoch, rng)}
        metrics, stop = {}, False
        if rank == 0 and not validate:
            row.update(node_id=node)
            metrics = row
        elif rank == 0:  # TuneReportCallback forwards rank 0's metrics, so rank 0 sees all of val
            probs, targets, row["val_loss"] = predict(parts, _batches(val_data, config.batch_size, False))
            row.update(score_epoch(probs, targets, config, meta["classes"]))
            stopper.update(row[OBJECTIVE], epoch + 1)
            stop = stopper.should_stop
            row.update(best_epoch=stopper.best_epoch, early_stopped=stop, node_id=node)
            metrics = row
        if world > 1:  # every rank must take the same branch and report the same number of times
            decision = [stop]
            torch.distributed.broadcast_object_list(decision, src=0)
            stop = decision[0]
        if rank == 0:
            # Every epoch: Train keeps the best (by the objective) and always the latest, which a
            # retried or resumed trial continues from.
            with tempfile.TemporaryDirectory() as directory:
                state = {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                         "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
                         "epoch": epoch + 1, "best": stopper.best, "best_epoch": stopper.best_epoch,
                         "waited": stopper.waited}
                torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
                if validate:
                    np.savez_compressed(os.path.join(directory, PREDICTIONS_FILE), probs=probs, targets=targets,
                                        classes=np.array(meta["classes"]))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if stop:
            return


def run_trial(sampled: dict, setup: TrialSetup) -> None:
    """The Tune trial: this trial's Datasets and one TorchTrainer run for its configuration."""
    config = setup.space.config_for(sampled)
    trial_id = ray.tune.get_context().get_trial_id()
    use_gpu = setup.gpus_per_worker > 0
    resources = {"CPU": setup.cpus_per_worker, **({"GPU": setup.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(), "meta": setup.meta},
        scaling_config=ScalingConfig(num_workers=setup.workers_per_trial, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=build_datasets(setup.data_dir, setup.meta, config),
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            # Named by trial id, never a timestamp: a restored trial finds its Train run again.
            name=f"{setup.sweep_name}-{trial_id}",
            storage_path=setup.storage_path.rstrip("/") + "/train",
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=OBJECTIVE, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=setup.max_failures),
        ),
    )
    trainer.fit()
