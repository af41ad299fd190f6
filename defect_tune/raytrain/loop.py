"""The training run every Ray Train driver starts: what each worker runs, how the Datasets are
split across workers, and how often Train polls them. A sweep's trial (`search/trial.py`) and
`retrain` (`production/retrain.py`) both fit one `TorchTrainer` with these."""

from __future__ import annotations

import math
import time

from ray.train import DataConfig

from defect_tune.ray_compat import TRAIN_HEALTH_CHECK_S
from defect_tune.raytrain.loop_config import LoopConfig

# How often a trial's Train controller polls its workers (Ray's default: 2 s). A worker's
# `report` waits until the controller has taken the one before it, and the controller notices
# the end of training only at its next poll, so short epochs (a GPU, a small set) waited on the
# poll; a shorter one costs little CPU (results/benchmarks/train_poll.md).
TRAIN_POLL_ENV, TRAIN_POLL_S = TRAIN_HEALTH_CHECK_S, "0.25"


def keeps_train(meta: dict, workers: int, limit_bytes: float, train_splits: tuple[str, ...] = ("train",)) -> bool:
    """Whether each worker's train shard (stored uint8 images) fits `limit_bytes`."""
    image = meta["image"]
    images = sum(meta["splits"][split]["images"] for split in train_splits)
    per_worker = math.ceil(images / workers) * image["height"] * image["width"]
    return per_worker <= limit_bytes


def train_loop_per_worker(loop_config: dict) -> None:
    """Ordinary training core plus three Ray calls (`prepare_model`, `get_dataset_shard`, `report`):
    `worker.run`, the engine's epochs fed from this worker's shard. `loop_config` is a
    `LoopConfig` as a dict (loop_config.py defines each key).

    The worker module is imported here, in the worker, not at the top of this module: the trial's
    other processes (Tune's trial actor, Train's controller) unpickle this function too, and
    importing torch, timm, albumentations and scikit-learn there costs each of them seconds of CPU.
    """
    loop_started = time.time()
    from defect_tune.raytrain import worker
    worker.run(LoopConfig.from_dict(loop_config), loop_started)


def dataset_config(workers: int) -> DataConfig:
    """Train split across workers. One worker reads its Datasets itself: splitting would start a
    coordinator actor per Dataset to hand everything to that one worker (seconds of start-up)."""
    return DataConfig(datasets_to_split=["train"] if workers > 1 else [])
