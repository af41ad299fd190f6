"""One search trial on Ray: the trial's own Ray Datasets, a TorchTrainer, and the worker loop.

Ray stays at the edges: the worker loop is the training core (`train.py`) plus
`get_dataset_shard` and `report`. Every trial builds its Datasets itself: one Dataset shared by
all trials leaked a CPU per trial that ASHA stopped and hung the sweep (see the project notes;
https://github.com/ray-project/ray/issues/54305 for the placement-group side).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from defect_tune.config import OBJECTIVE, PREDICTIONS_FILE, TrainConfig
from defect_tune.data import filesystem_for
from defect_tune.ingest import build_datasets, data_tasks_at_once
from defect_tune.post import trial_mailbox

CHECKPOINT_FILE = "model.pt"

# How often a trial's Train controller polls its workers (Ray's default: 2 s). A worker's
# `report` waits until the controller has taken the one before it, and the controller notices
# the end of training only at its next poll. With 2 s, a worker loop of 3 reports 0.5 s apart
# took 9 s to its Train run's end, and 2 s with 0.2 s; on a GPU, where an epoch of a small
# dataset is well under a second, each report waited up to 2 s. Polling every 0.25 s added about
# 0.015 of a core to a trial with two workers (both measured here, on 2 cores:
# benchmarks/bench_train_poll.py, results/benchmarks/train_poll.md).
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


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
    folds: tuple[dict, ...] = ()  # --cv: each fold's meta (folds.make_folds); empty: prepare's split
    keep_train_bytes: float = 0  # a worker's train shard up to this size is kept in memory; 0: streamed every epoch


def _batches(iterator, batch_size: int, drop_last: bool, shuffle: bool = False, seed: int | None = None, pipeline=None,
             as_uint8: bool = False, keep: list | None = None):
    """(images, labels) batches from a Dataset shard: normalised tensors, or the stored uint8
    images and float labels as numpy (`as_uint8`, 4x smaller to keep). With `keep`, every
    batch's uint8 images and labels, before augmentation, are appended to it."""
    import torch

    from defect_tune.augment import augment_batch
    from defect_tune.data import to_tensor

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


def _kept_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, drop_last: bool, rng: np.random.Generator,
                  pipeline=None):
    """Batches of a shard kept in memory, in a new random order: what `_batches` gives, without
    Ray Data running the shard's read and decode again."""
    import torch

    from defect_tune.augment import augment_batch
    from defect_tune.data import to_tensor

    order = rng.permutation(len(labels))
    for start in range(0, len(order) - batch_size + 1 if drop_last else len(order), batch_size):
        index = order[start:start + batch_size]
        yield to_tensor(augment_batch(pipeline, images[index])), torch.from_numpy(labels[index])


def keeps_train(meta: dict, workers: int, limit_bytes: float, train_splits: tuple[str, ...] = ("train",)) -> bool:
    """Whether each worker's train shard (stored uint8 images) fits `limit_bytes`."""
    image = meta["image"]
    images = sum(meta["splits"][split]["images"] for split in train_splits)
    per_worker = math.ceil(images / workers) * image["height"] * image["width"]
    return per_worker <= limit_bytes


def _noting_first(batches, times: list[float]):
    """`batches`, appending the time the first one arrived to `times`."""
    for batch in batches:
        if not times:
            times.append(time.time())
        yield batch


def train_loop_per_worker(loop_config: dict) -> None:
    """Ordinary training core plus three Ray calls (`prepare_model`, `get_dataset_shard`, `report`).

    loop_config: `config`, `meta`; for production retraining also `stop_after` (train this many
    epochs of a schedule laid out for `config.epochs`), `validate` (False: no val split, so no
    objective and no early stopping) and `reproducible` (augment here, seeded by epoch and rank);
    for sweeps `trial_started_s`, the trial function's start, and `datasets_built_s`, when the
    trial had built its Datasets and was about to start this run (Unix times), from which rank 0
    reports where the trial's start-up went (`startup/*`, seconds, in disjoint parts) with every
    epoch, and
    `keep_train`: keep this worker's train shard in memory after its first epoch and augment
    here (each epoch otherwise runs the shard's Ray Data read and decode again: seconds before
    its first batch, measured in results/benchmarks/sweep_efficiency_h200.md), and `diverged`:
    when the training loss turns non-finite on any worker, report this (the objective's worst
    value, with the loss named under `diverged`) once and end, where retraining raises.

    The training core is imported here, in the worker, not at the top of this module: the trial's
    other processes (Tune's trial actor, Train's controller) unpickle this function too, and
    importing timm, albumentations and scikit-learn there cost each of them about 10 s of CPU.
    """
    loop_started = time.time()
    import ray.train.torch
    import torch

    from defect_tune.augment import build_augmentation
    from defect_tune.data import to_tensor
    from defect_tune.train import (EarlyStopping, NonFiniteLoss, build_parts, predict, score_epoch, seed_everything,
                                   train_one_epoch)

    config = TrainConfig.model_validate(loop_config["config"])
    meta = loop_config["meta"]
    stop_after = loop_config.get("stop_after", config.epochs)
    validate = loop_config.get("validate", True)
    reproducible = loop_config.get("reproducible", False)
    diverged = loop_config.get("diverged")  # sweeps: what a diverged trial reports; None: it raises
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
    model_ready = time.time()
    stopper = EarlyStopping(config.early_stopping_patience)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried or resumed trial continues after its last epoch
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        start = state["epoch"]
        stopper.best, stopper.best_epoch, stopper.waited = state["best"], state["best_epoch"], state["waited"]
        if (start >= stop_after or stopper.should_stop) and "metrics_json" in state:
            # Its last epoch was checkpointed, but the driver died before Tune recorded it: report
            # that epoch again (with its checkpoint), or the resumed trial would end with no result.
            ray.train.report(json.loads(state["metrics_json"]) if rank == 0 else {},
                             checkpoint=checkpoint if rank == 0 else None)
            return
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.scheduler is not None:
            parts.scheduler.load_state_dict(state["scheduler"])
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val") if validate else None
    val_cache: list | None = None  # rank 0 reads val once: it is neither augmented nor shuffled
    shape = (meta["image"]["height"], meta["image"]["width"])
    rng = np.random.default_rng(config.seed + rank)
    node = ray.get_runtime_context().get_node_id()
    timing: dict = {}
    if "trial_started_s" in loop_config:
        built = loop_config.get("datasets_built_s", loop_config["trial_started_s"])
        timing = {"trial_started_s": loop_config["trial_started_s"],
                  "startup/datasets_s": built - loop_config["trial_started_s"],
                  "startup/trainer_s": loop_started - built,
                  "startup/model_s": model_ready - loop_started}
    first_batch: list[float] = []
    keep_train = loop_config.get("keep_train", False)
    kept: list | None = [] if keep_train else None  # this worker's shard, filled by its first epoch here
    shard: tuple[np.ndarray, np.ndarray] | None = None  # ... and after it, as (images, labels)
    for epoch in range(start, stop_after):
        epoch_started = time.time()
        pipeline = None
        if reproducible:
            pipeline = build_augmentation(config.augment, shape, config.seed + 1000 * epoch + rank)
        elif keep_train:
            pipeline = build_augmentation(config.augment, shape, int(rng.integers(2**32)))
        if shard is not None:
            batches = _kept_batches(*shard, config.batch_size, drop_last, rng, pipeline)
        else:
            batches = _batches(train_shard, config.batch_size, drop_last, shuffle=True,
                               seed=config.seed + rank if reproducible else None, pipeline=pipeline, keep=kept)
        if timing and not first_batch:
            batches = _noting_first(batches, first_batch)
        try:  # one of several workers finishes its epoch: the others wait for it in every all-reduce
            row = {"epoch": epoch + 1, **train_one_epoch(parts, config, batches, epoch, rng, finish_on_nonfinite=world > 1)}
            nonfinite = row.pop("nonfinite", None)
        except NonFiniteLoss as error:
            if diverged is None:
                raise
            row, nonfinite = {"epoch": epoch + 1}, str(error)
        if world > 1:  # every rank learns whether any diverged, so that all of them end together
            seen = [None] * world
            torch.distributed.all_gather_object(seen, nonfinite)
            nonfinite = next((message for message in seen if message is not None), None)
        if kept:
            shard, kept = (np.concatenate([i for i, _ in kept]), np.concatenate([y for _, y in kept])), None
        metrics, stop = {}, False
        if rank == 0 and timing:
            if "startup/first_batch_s" not in timing:
                timing["startup/first_batch_s"] = first_batch[0] - model_ready
            row.update(timing)
        if nonfinite is not None:
            if diverged is None:
                raise NonFiniteLoss(nonfinite)
            # A diverged configuration is a result, not a crash: reported once with its objective's
            # worst value (Optuna learns from it, ASHA ranks it last), never retried.
            if rank == 0:
                row.update(diverged, diverged=f"NonFiniteLoss: {nonfinite}", node_id=node,
                           epoch_s=time.time() - epoch_started, timestamp_s=time.time())
            ray.train.report(row if rank == 0 else {})
            return
        if rank == 0 and not validate:
            row.update(node_id=node)
            metrics = row
        elif rank == 0:  # the trial hands rank 0's metrics on to Tune, so rank 0 sees all of val
            if val_cache is None:
                val_cache = list(_batches(val_data, config.batch_size, False, as_uint8=True))
            probs, targets, row["val_loss"] = predict(parts, ((to_tensor(x), torch.from_numpy(y)) for x, y in val_cache))
            row.update(score_epoch(probs, targets, config, meta["classes"]))
            stopper.update(row[OBJECTIVE], epoch + 1)
            stop = stopper.should_stop
            row.update(best_epoch=stopper.best_epoch, early_stopped=stop, node_id=node)
            metrics = row
        if rank == 0:
            row.update(epoch_s=time.time() - epoch_started, timestamp_s=time.time())
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
                         "waited": stopper.waited,
                         # The reported row, as text (weights_only loading takes no numpy scalars).
                         "metrics_json": json.dumps(metrics, default=lambda value: value.item())}
                torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
                if validate:
                    np.savez_compressed(os.path.join(directory, PREDICTIONS_FILE), probs=probs, targets=targets,
                                        classes=np.array(meta["classes"]))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if stop:
            return


def diverged_report(objective: str, mode: str) -> dict:
    """The objective a diverged trial reports: its worst value. Every metric a sweep maximises
    (recall, precision, F2, AP) is at least 0; one it minimises (a loss) is at most infinity."""
    return {objective: 0.0 if mode == "max" else math.inf}


def dataset_config(workers: int) -> DataConfig:
    """Train split across workers. One worker reads its Datasets itself: splitting would start a
    coordinator actor per Dataset to hand everything to that one worker (seconds of start-up)."""
    return DataConfig(datasets_to_split=["train"] if workers > 1 else [])


def _trainer(config: TrainConfig, setup: TrialSetup, meta: dict, name: str, started: float, callbacks: list) -> TorchTrainer:
    use_gpu = setup.gpus_per_worker > 0
    resources = {"CPU": setup.cpus_per_worker, **({"GPU": setup.gpus_per_worker} if use_gpu else {})}
    keep = keeps_train(meta, setup.workers_per_trial, setup.keep_train_bytes)
    datasets = build_datasets(setup.data_dir, meta, config, worker_augments=keep,
                              tasks_at_once=data_tasks_at_once(setup.workers_per_trial, setup.cpus_per_worker))
    loop_config = {"config": config.model_dump(), "meta": meta, "trial_started_s": started, "datasets_built_s": time.time(),
                   "keep_train": keep}
    if setup.space is not None:
        loop_config["diverged"] = diverged_report(setup.space.objective, setup.space.mode)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=setup.workers_per_trial, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=dataset_config(setup.workers_per_trial),
        run_config=RunConfig(
            # Named by trial id, never a timestamp: a restored trial finds its Train run again.
            name=name,
            storage_path=_train_storage(setup),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=OBJECTIVE, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=setup.max_failures),
        ),
    )


def run_trial(sampled: dict, setup: TrialSetup) -> None:
    """The Tune trial: this trial's Datasets and one TorchTrainer run for its configuration, or
    one per fold under `--cv` (`run_folds`)."""
    started = time.time()
    # Train hands this process's value on to the controller it starts; a user's own value stays.
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    config = setup.space.config_for(sampled)
    name = f"{setup.sweep_name}-{ray.tune.get_context().get_trial_id()}"
    if setup.folds:
        run_folds(config, setup, name, started)
    else:
        fit_and_report(lambda callbacks: _trainer(config, setup, setup.meta, name, started, callbacks))


def fit_and_report(build) -> None:
    """Fits `build(callbacks)` (a TorchTrainer) in a thread; this, the trial's thread, hands each
    of the run's reports to Tune with `ray.tune.report`, in order, and returns once the run has
    ended and every report was handed on. A run that fails raises here.

    Not Ray's `TuneReportCallback`: it hands the controller's reports to Tune from the trial
    actor's main thread, which races the trial thread's own end-of-trial marker for Tune's
    one-slot result queue. When the last report and the end of `fit()` came close together (with
    the controller polling every 0.25 s, in the ASHA test here), the main thread blocked on that
    full queue forever and the sweep hung (its stack: `_get_result_from_queues` -> `report` ->
    `Queue.put`, ray/train/_internal/session.py, Ray 2.60; the bridge is
    https://github.com/ray-project/ray/pull/55556)."""
    errors: list[BaseException] = []
    with trial_mailbox() as (reports, key):

        def fit() -> None:
            try:
                build([QueueReportCallback(0, reports, key)]).fit()
            except BaseException as error:  # noqa: BLE001 - handed to the trial's thread, which raises it
                errors.append(error)

        thread = threading.Thread(target=fit, name="fit", daemon=True)
        thread.start()
        while True:
            ended = not thread.is_alive()  # read first: every report is queued before fit() returns
            rows = ray.get(reports.take.remote(key, 0 if ended else 1.0))
            for _, row in rows:
                ray.tune.report(row)
            if ended and not rows:
                break
    if errors:
        raise errors[0]


class QueueReportCallback(UserCallback):
    """Runs in a Train run's controller: hands rank 0's report (with its checkpoint's path) to the
    trial through the sweep's report post (`post.ReportPost`), as `(fold, row)` under the trial's `key`, and
    returns once it is there (so every report is queued before the run's `fit()` returns).

    Under `--cv` (`predictions` given) it also copies the epoch's held-out predictions to
    `<predictions>/epoch_<e>/fold<k>.npz` (a path or URI on the sweep's storage): Train keeps only
    each fold's best and latest checkpoints, and the epoch the fold-mean picks may be neither."""

    def __init__(self, fold: int, reports, key: str, predictions: str | None = None):
        self.fold, self.reports, self.key, self.predictions = fold, reports, key, predictions

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        row = dict(metrics[0])
        if not row:  # ranks other than 0 report nothing
            return
        if checkpoint is not None:
            row["checkpoint_path"] = checkpoint.path
        if checkpoint is not None and self.predictions is not None:
            folder = f"{self.predictions}/epoch_{int(row['epoch']):03d}"
            filesystem, path = filesystem_for(folder)
            filesystem = filesystem or pafs.LocalFileSystem()
            filesystem.create_dir(path, recursive=True)
            pafs.copy_files(f"{checkpoint.path}/{PREDICTIONS_FILE}", f"{path}/fold{self.fold}.npz",
                            source_filesystem=checkpoint.filesystem, destination_filesystem=filesystem)
            row["predictions_path"] = f"{folder}/fold{self.fold}.npz"
        ray.get(self.reports.put.remote(self.key, (self.fold, row)))


def _train_storage(setup: TrialSetup) -> str:
    """Where Train keeps a trial's runs (checkpoints) and, under --cv, the folds' kept predictions."""
    return setup.storage_path.rstrip("/") + "/train"


def run_folds(config: TrainConfig, setup: TrialSetup, name: str, started: float) -> None:
    """One TorchTrainer per fold, side by side (each waits for its workers like any trial's), and
    one report to Tune per epoch: the fold-mean (`folds.FoldMean`), once every fold reached it.
    A fold that fails (after its own `--max-failures` retries) fails the trial; one that diverges
    ends it with that fold's report (the other folds' Train runs end with the trial's process)."""
    from defect_tune.folds import FoldMean

    errors: dict[int, BaseException] = {}
    with trial_mailbox() as (reports, key):

        def fit(fold: int, meta: dict) -> None:
            try:
                callback = QueueReportCallback(fold, reports, key, f"{_train_storage(setup)}/{name}-folds")
                _trainer(config, setup, meta, f"{name}-fold{fold}", started, [callback]).fit()
            except BaseException as error:  # noqa: BLE001 - handed to the trial's thread, which raises it
                errors[fold] = error

        threads = [threading.Thread(target=fit, args=(fold, meta), name=f"fold{fold}", daemon=True)
                   for fold, meta in enumerate(setup.folds)]
        for thread in threads:
            thread.start()
        mean = FoldMean(len(threads), setup.space.objective)
        while not mean.done:
            ended = [fold for fold, thread in enumerate(threads) if not thread.is_alive() and fold not in mean.finished]
            # A fold's reports are all queued before its fit() returns: drain, then mark it ended.
            for fold, row in ray.get(reports.take.remote(key, 0 if ended else 1.0)):
                if "diverged" in row:  # the configuration diverged on this fold: so ends the trial
                    ray.tune.report({**row, "diverged": f"fold {fold}: {row['diverged']}", "folds": len(threads)})
                    return
                mean.add(fold, row)
            for fold in ended:
                if fold in errors:
                    raise RuntimeError(f"fold {fold} of {len(threads)} failed: {errors[fold]}") from errors[fold]
                mean.finish(fold)
            for row in mean.ready():
                ray.tune.report(row)
