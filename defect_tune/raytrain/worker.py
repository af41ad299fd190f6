"""The Ray Train worker loop: the engine's epochs (`engine.run_epochs`) fed from this worker's
Ray Data shard and reported to Train, with a checkpoint, every epoch.

Imported only inside training workers (`trial.train_loop_per_worker` imports it there): the
trial's other processes unpickle that function too, and importing torch, timm and
albumentations there cost each of them seconds of CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from defect_tune.core.config import PREDICTIONS_FILE, TrainConfig
from defect_tune.data.augment import build_augmentation
from defect_tune.data.shards import to_tensor
from defect_tune.raytrain.loop_config import LoopConfig
from defect_tune.training.cost import model_cost, peak_memory_mb
from defect_tune.training.engine import (
    EarlyStopping,
    Hooks,
    NonFiniteLoss,
    Progress,
    build_parts,
    memory_batches,
    run_epochs,
    seed_everything,
)

CHECKPOINT_FILE = "model.pt"


def shard_batches(iterator, batch_size: int, drop_last: bool, shuffle: bool = False, seed: int | None = None,
                  pipeline=None, as_uint8: bool = False, keep: list | None = None):
    """(images, labels) batches from a Dataset shard: normalised tensors, or the stored uint8
    images and float labels as numpy (`as_uint8`, 4x smaller to keep). With `keep`, every
    batch's uint8 images and labels, before augmentation, are appended to it."""
    from defect_tune.data.augment import augment_batch

    buffer = 4 * batch_size if shuffle else None  # rows mix across shards within each epoch
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                       local_shuffle_buffer_size=buffer, local_shuffle_seed=seed if shuffle else None):
        labels = np.ascontiguousarray(batch["labels"])
        if keep is not None:
            keep.append((batch["image"], labels))
        if drop_last and len(labels) < batch_size:
            continue  # read (and kept) all the same: a kept shard is the whole shard
        images = batch["image"] if pipeline is None else augment_batch(pipeline, batch["image"])
        yield (images, labels) if as_uint8 else (to_tensor(images), torch.from_numpy(labels))


def _joined(parts: list) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


class WorkerHooks(Hooks):
    """One Train worker's side of the engine.

    Training batches stream from the worker's Ray Data shard, or come from the shard kept in
    memory (`keep_train`: after the first epoch; from the start in a reproducible run, and for an
    oversampling config, since a weighted draw needs every image at hand). Rank 0 validates,
    checkpoints and reports; the other ranks report nothing, the same number of times.

    A reproducible run (`retrain`) that keeps its shard draws every epoch as `train` does: a new
    permutation of the whole shard (`engine.draw_order`). Streamed with a fixed shuffle seed, every
    epoch would see the same batches, each mixed only within a buffer of a few batches."""

    def __init__(self, loop: LoopConfig, config: TrainConfig, parts, stopper: EarlyStopping, drop_last: bool,
                 rank: int, world: int, train_shard, val_data, node: str, report=ray.train.report,
                 timing: dict | None = None, model_ready: float = 0.0, cost: dict | None = None):
        self.config, self.meta, self.parts, self.stopper, self.drop_last = config, loop.meta, parts, stopper, drop_last
        self.rank, self.world, self.train_shard, self.val_data = rank, world, train_shard, val_data
        self.node, self.report = node, report
        self.trial_relay = loop.trial_relay
        self.stop_after = config.epochs if loop.stop_after is None else loop.stop_after
        self.validate = loop.validate
        self.reproducible = loop.reproducible
        self.keep = loop.keep_train  # the trial sets it for an oversampling config too
        self.val_cache: list | None = None  # rank 0 reads val once: it is neither augmented nor shuffled
        self.shape = (self.meta["image"]["height"], self.meta["image"]["width"])
        self.rng = np.random.default_rng(config.seed + self.rank)
        self.kept: list | None = None  # filled by the first epoch when keeping a streamed shard
        self.shard: tuple[np.ndarray, np.ndarray] | None = None
        self.timing = timing or {}  # sweeps: where the trial's start-up went, reported by rank 0
        self.cost = cost or {}  # sweeps: the model's size, FLOPs and latency (training/cost.py), reported by rank 0
        self.first_batch: list[float] = []
        self.model_ready = model_ready  # when the model was built: the first batch's wait counts from here

    def train_batches(self, epoch: int):
        config = self.config
        pipeline = None
        if self.reproducible:
            pipeline = build_augmentation(config.augment, self.shape, config.seed + 1000 * epoch + self.rank)
        elif self.keep:
            pipeline = build_augmentation(config.augment, self.shape, int(self.rng.integers(2**32)))
        if self.kept:
            self.shard, self.kept = _joined(self.kept), None
        if self.shard is None and (config.oversample_power > 0 or (self.keep and self.reproducible)):
            self.shard = _joined(list(shard_batches(self.train_shard, config.batch_size, False, as_uint8=True)))
        if self.shard is not None:
            batches = memory_batches(*self.shard, config, self.drop_last, self.rng, pipeline)
        else:
            self.kept = [] if self.keep else None
            batches = shard_batches(self.train_shard, config.batch_size, self.drop_last, shuffle=True,
                                    seed=config.seed + 1000 * epoch + self.rank if self.reproducible else None,
                                    pipeline=pipeline,
                                    keep=self.kept)
        return self._noting_first(batches) if self.timing and not self.first_batch else batches

    def _noting_first(self, batches):
        for batch in batches:
            if not self.first_batch:
                self.first_batch.append(time.time())
            yield batch

    def val_batches(self):
        if not self.validate or self.rank != 0:
            return None
        if self.val_cache is None:
            self.val_cache = list(shard_batches(self.val_data, self.config.batch_size, False, as_uint8=True))
        return ((to_tensor(x), torch.from_numpy(y)) for x, y in self.val_cache)

    def any_nonfinite(self, message: str | None) -> str | None:
        if self.world == 1:
            return message
        seen = [None] * self.world  # every rank learns whether any diverged, so that all end together
        torch.distributed.all_gather_object(seen, message)
        return next((m for m in seen if m is not None), None)

    def trial_ended(self) -> bool:
        """A `--cv` fold: whether its trial has ended (another fold diverged, `trial.stop_folds`)."""
        if self.trial_relay is None:
            return False
        relay, key = self.trial_relay
        return not ray.get(relay.is_open.remote(key))

    def agree(self, decision: dict) -> dict:
        if self.rank == 0 and not decision["stop"] and self.trial_ended():
            decision = {**decision, "stop": True}
        if self.world == 1:
            return decision
        shared = [decision]  # every rank must step its schedule alike and report the same number of times
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    def end_epoch(self, row: dict, improved: bool, scored) -> None:
        if self.rank != 0:
            self.report({})
            return
        if self.timing:
            if "startup/first_batch_s" not in self.timing and self.first_batch:
                self.timing["startup/first_batch_s"] = self.first_batch[0] - self.model_ready
            row.update(self.timing)
        if self.cost:
            row.update(self.cost, **{"cost/peak_memory_mb": peak_memory_mb(self.parts.device)})
        # planned_epochs: a trial that ends before the space's max_epochs by its own epoch budget
        # completed; one that ASHA stopped there did not (search.AshaAwareOptunaSearch).
        row.update(node_id=self.node, epoch_s=row["seconds"], timestamp_s=time.time(), planned_epochs=self.stop_after)
        parts, stopper = self.parts, self.stopper
        # Every epoch: Train keeps the best (by the selection score) and always the latest, which a
        # retried or resumed trial continues from.
        with tempfile.TemporaryDirectory() as directory:
            state = {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                     "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
                     "epoch": row["epoch"], "best": stopper.best, "best_epoch": stopper.best_epoch,
                     "waited": stopper.waited,
                     # The reported row, as text (weights_only loading takes no numpy scalars).
                     "metrics_json": json.dumps(row, default=lambda value: value.item())}
            torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
            if scored is not None:
                probs, targets = scored
                np.savez_compressed(os.path.join(directory, PREDICTIONS_FILE), probs=probs, targets=targets,
                                    classes=np.array(self.meta["classes"]))
            self.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run(loop: LoopConfig, loop_started: float) -> None:
    """The body of `trial.train_loop_per_worker`."""
    config = TrainConfig.model_validate(loop.config)
    meta = loop.meta
    stop_after = config.epochs if loop.stop_after is None else loop.stop_after
    diverged = loop.diverged
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(config.seed)  # same initial weights on every worker; DDP keeps them in step
    if loop.reproducible:
        torch.use_deterministic_algorithms(True, warn_only=True)  # some CUDA kernels have no deterministic version
    train_images = sum(meta["splits"][split]["images"] for split in loop.train_splits)
    per_worker = train_images // world
    drop_last = per_worker > config.batch_size
    steps = max(per_worker // config.batch_size if drop_last else 1, 1)
    parts = build_parts(config, meta, steps, ray.train.torch.get_device())
    parts.net = ray.train.torch.prepare_model(
        parts.model, parallel_strategy_kwargs={"find_unused_parameters": config.freeze_epochs > 0}
    )
    cost = {}
    if loop.in_sweep and rank == 0:  # what the configuration costs, once
        cost = model_cost(parts.model, meta["image"]["height"], meta["image"]["width"], parts.device)
    model_ready = time.time()
    timing = {}
    if loop.in_sweep:  # where the trial's start-up went (`startup/*`, seconds, disjoint)
        built = loop.datasets_built_s or loop.trial_started_s
        timing = {"trial_started_s": loop.trial_started_s,
                  "startup/datasets_s": built - loop.trial_started_s,
                  "startup/trainer_s": loop_started - built,
                  "startup/model_s": model_ready - loop_started}
    progress = Progress(EarlyStopping(config.early_stopping_patience))
    stopper = progress.stopper
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried or resumed trial continues after its last epoch
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        progress.start_epoch = state["epoch"]
        stopper.best, stopper.best_epoch, stopper.waited = state["best"], state["best_epoch"], state["waited"]
        if (progress.start_epoch >= stop_after or stopper.should_stop) and "metrics_json" in state:
            # Its last epoch was checkpointed, but the driver died before Tune recorded it: report
            # that epoch again (with its checkpoint), or the resumed trial would end with no result.
            ray.train.report(json.loads(state["metrics_json"]) if rank == 0 else {},
                             checkpoint=checkpoint if rank == 0 else None)
            return
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.scheduler is not None:
            parts.scheduler.load_state_dict(state["scheduler"])
    validate = loop.validate
    hooks = WorkerHooks(loop, config, parts, stopper, drop_last, rank, world, ray.train.get_dataset_shard("train"),
                        ray.train.get_dataset_shard("val") if validate else None,
                        ray.get_runtime_context().get_node_id(),
                        timing=timing, model_ready=model_ready, cost=cost)
    try:
        run_epochs(parts, config, meta["classes"], hooks, progress, stop_after, hooks.rng,
                   finish_on_nonfinite=world > 1)
    except NonFiniteLoss as error:
        if diverged is None:
            raise
        # A diverged configuration is a result, not a crash: reported once with its objective's
        # worst value (Optuna learns from it, ASHA ranks it last), never retried.
        row = {"epoch": error.epoch, **diverged, "diverged": f"NonFiniteLoss: {error}", "node_id": hooks.node,
               "timestamp_s": time.time()}
        ray.train.report(row if rank == 0 else {})
