"""What a sweep is asked to do (`SearchOptions`, the `search` command's options) and the error for
a sweep that cannot run as asked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from defect_tune.core.errors import UserError
from defect_tune.raytrain.loop_config import KEEP_TRAIN_GB


class SearchError(UserError):
    """A sweep that cannot start; the message says why."""


@dataclass(frozen=True)
class SearchOptions:
    data: Path | str  # a path every node reads, or a URI (s3://, gs://, file://)
    space: Path
    name: str
    out: Path | None = None  # default results/<name>
    num_samples: int | None = None  # default: the space's budget, or until the time budget runs out
    # Seconds after which Tune stops the sweep; trials still running keep the epochs they reported.
    time_budget_s: float | None = None
    workers_per_trial: int = 1
    # A scheduling share: Ray gives a worker with one CPU or less one torch thread either way, and
    # half a CPU lets two trials train side by side on a 2-core laptop with a core left for Data.
    cpus_per_worker: float = 0.5
    # "auto": one GPU per worker when the cluster has GPUs, none when it has not; 0 keeps trials
    # on the CPUs of a GPU cluster.
    gpus_per_worker: float | str = "auto"
    # Workers sharing each GPU (sets gpus_per_worker to 1/N), or "auto": as many as the space's
    # hungriest backbone leaves room for, measured on one of the cluster's GPUs.
    trials_per_gpu: int | str | None = None
    max_concurrent: int | None = None  # default: from the cluster's resources
    address: str | None = None  # None: start a local Ray cluster
    storage: str | None = None  # default: <out>/tune; a URI (s3://, gs://) or shared path for multi-node
    resume: bool = False
    seed: int = 0
    max_failures: int = 0
    wandb_project: str | None = None  # log every trial as a W&B run (offline without a key)
    cv: int | str | None = None  # folds per trial, 0 for none, or "auto"; None: the space's `cv`
    # A worker keeps its train shard in memory (and augments it itself) when the shard's images
    # take at most this much; 0: every epoch streams it from Ray Data, augmented there.
    keep_train_gb: float = KEEP_TRAIN_GB
    # `key=value` from the command line: `epochs` sets the space's max_epochs, any other
    # TrainConfig key a fixed value (SearchSpace.with_overrides). A resumed sweep keeps its own.
    overrides: dict = dataclasses.field(default_factory=dict)
    upsample: bool = False  # let trials enlarge stored images (input_size above the prepared size)
