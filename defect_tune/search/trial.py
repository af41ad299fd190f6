"""One search trial on Ray: the trial's own Ray Datasets, a TorchTrainer, and the worker loop.

Ray stays at the edges: the worker loop is the training core (`train.py`) plus
`get_dataset_shard` and `report`. Every trial builds its Datasets itself: one Dataset shared by
all trials leaked a CPU per trial that ASHA stopped and hung the sweep (see the project notes;
https://github.com/ray-project/ray/issues/54305 for the placement-group side).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from defect_tune.core.config import PREDICTIONS_FILE, SELECTION, TrainConfig, selection_metric
from defect_tune.data.shards import filesystem_for
from defect_tune.raytrain.ingest import build_datasets, data_tasks_at_once
from defect_tune.raytrain.loop import TRAIN_POLL_ENV, TRAIN_POLL_S, dataset_config, keeps_train, train_loop_per_worker
from defect_tune.raytrain.loop_config import LoopConfig
from defect_tune.search.report_relay import trial_report_queue


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


def diverged_report(objective: str, mode: str, trade_offs: tuple = ()) -> dict:
    """The objective a diverged trial reports: its worst value. Every metric a sweep maximises
    (recall, precision, F2, AP) is at least 0; one it minimises (a loss, a cost) is at most
    infinity. A multi-objective sweep's searcher needs each trade-off too."""
    worst = 0.0 if mode == "max" else math.inf
    return {objective: worst, selection_metric(objective): worst,
            **{metric: 0.0 if how == "max" else math.inf for metric, how in trade_offs}}


def kept_checkpoint(space) -> CheckpointConfig:
    """The one checkpoint Train keeps: the best epoch by what the sweep ranks by, in its direction.
    The leaderboard names that epoch's checkpoint, so under a space's own `mode: min` objective a
    checkpoint kept by the built-in score would be another epoch's, and the named one deleted."""
    if space is None:
        return CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SELECTION, checkpoint_score_order="max")
    return CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=selection_metric(space.objective),
                            checkpoint_score_order=space.mode)


def _trainer(config: TrainConfig, setup: TrialSetup, meta: dict, name: str, started: float, callbacks: list,
             trial_relay: tuple | None = None) -> TorchTrainer:
    use_gpu = setup.gpus_per_worker > 0
    resources = {"CPU": setup.cpus_per_worker, **({"GPU": setup.gpus_per_worker} if use_gpu else {})}
    # A weighted draw needs the whole shard at hand: an oversampling worker keeps it whatever its size.
    keep = keeps_train(meta, setup.workers_per_trial, setup.keep_train_bytes) or config.oversample_power > 0
    datasets = build_datasets(setup.data_dir, meta, config, worker_augments=keep,
                              tasks_at_once=data_tasks_at_once(setup.workers_per_trial, setup.cpus_per_worker))
    loop = LoopConfig(config=config.model_dump(), meta=meta, trial_started_s=started, datasets_built_s=time.time(),
                      keep_train=keep, trial_relay=trial_relay,
                      diverged=diverged_report(setup.space.objective, setup.space.mode, setup.space.trade_offs)
                      if setup.space is not None else None)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.as_dict(),
        scaling_config=ScalingConfig(num_workers=setup.workers_per_trial, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        datasets=datasets,
        dataset_config=dataset_config(setup.workers_per_trial),
        run_config=RunConfig(
            # Named by trial id, never a timestamp: a restored trial finds its Train run again.
            name=name,
            storage_path=_train_storage(setup),
            callbacks=callbacks,
            checkpoint_config=kept_checkpoint(setup.space),
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
    with trial_report_queue() as (reports, key):

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
    trial through the sweep's report relay (`report_relay.ReportRelay`), as `(fold, row)` under the trial's `key`, and
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


def stop_folds(reports, key: str, threads: list[threading.Thread], started: float) -> int:
    """Closes the trial's key, so that each fold's workers stop after their current epoch
    (`worker.WorkerHooks.agree`) and its Train run ends by itself, giving its placement group back
    before the trial ends. Left to die with the trial's process, a run's placement group waits for
    Train's detached cleaner, which polls the State API and can lag or fail on a loaded node.

    Waits at most as long as the trial has run so far (an epoch takes less than the epochs before
    it) and never under a minute; a fold still waiting for its workers is left to that cleaner.
    Returns how many folds were so left, for the trial's report (the sweep's end removes what
    the cleaner has not, `resources.wait_for_release`)."""
    ray.get(reports.close.remote(key))
    deadline = time.monotonic() + max(60.0, time.time() - started)
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return sum(thread.is_alive() for thread in threads)


def run_folds(config: TrainConfig, setup: TrialSetup, name: str, started: float) -> None:
    """One TorchTrainer per fold, side by side (each waits for its workers like any trial's), and
    one report to Tune per epoch: the fold-mean (`folds.FoldMean`), once every fold reached it.
    A fold that fails (after its own `--max-failures` retries) fails the trial; one that diverges
    ends it with that fold's report, once the other folds have stopped (`stop_folds`)."""
    from defect_tune.data.folds import FoldMean

    errors: dict[int, BaseException] = {}
    with trial_report_queue() as (reports, key):

        def fit(fold: int, meta: dict) -> None:
            try:
                callback = QueueReportCallback(fold, reports, key, f"{_train_storage(setup)}/{name}-folds")
                _trainer(config, setup, meta, f"{name}-fold{fold}", started, [callback], (reports, key)).fit()
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
                    left = stop_folds(reports, key, threads, started)
                    ray.tune.report({**row, "diverged": f"fold {fold}: {row['diverged']}", "folds": len(threads),
                                     "folds_left_to_cleaner": left})
                    return
                mean.add(fold, row)
            for fold in ended:
                if fold in errors:
                    raise RuntimeError(f"fold {fold} of {len(threads)} failed: {errors[fold]}") from errors[fold]
                mean.finish(fold)
            for row in mean.ready():
                ray.tune.report(row)
