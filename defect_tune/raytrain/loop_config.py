"""What every Train worker of a run is handed: the typed form of Ray Train's `train_loop_config`.

Train passes a plain dict to `train_loop_per_worker`; `LoopConfig.as_dict` builds it and
`LoopConfig.from_dict` reads it back, refusing a key that is not a field. Light on purpose: the
trial, retrain and the worker all import it, and only the worker imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

# A worker keeps its train shard in memory when its stored images take at most this many GB: a
# sweep's default (`search --keep-train-gb`) and retrain's.
KEEP_TRAIN_GB = 2.0


def check_gpu_share(value: float | str) -> float | str:
    """`--gpus-per-worker` of `search` and `retrain`, from the command line or the Python API: a
    share of a GPU (0, 0.25, 1, 2, ...) or "auto" (resolved on the cluster, `cluster.gpus_per_worker`).
    Raises ValueError saying what it takes."""
    if value == "auto":
        return value
    try:
        share = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        share = math.nan
    if not 0 <= share < math.inf:
        raise ValueError(f"takes a share of a GPU (0, 0.25, 1, 2, ...) or auto, got {value!r}")
    return share


@dataclass(frozen=True)
class LoopConfig:
    config: dict  # TrainConfig.model_dump()
    meta: dict  # the prepared data's meta.json
    # Production retraining:
    stop_after: int | None = None  # train this many epochs of a schedule laid out for config.epochs; None: all
    validate: bool = True  # False: no val split, so no objective and no early stopping
    reproducible: bool = False  # augment in the worker, seeded by epoch and rank
    train_splits: tuple[str, ...] = ("train",)
    # Sweeps:
    trial_started_s: float | None = None  # Unix time the trial function started; rank 0 reports start-up (`startup/*`)
    datasets_built_s: float | None = None  # when the trial had built its Datasets and was about to start this run
    keep_train: bool = False  # keep this worker's train shard in memory after its first epoch and augment it here
    # What a diverged trial reports (the objective's worst value): once, then the run ends.
    # None (retraining): a non-finite loss raises.
    diverged: dict | None = None
    trial_relay: tuple | None = None  # --cv folds: (the sweep's report relay, the trial's key), to stop with the trial

    @property
    def in_sweep(self) -> bool:
        return self.trial_started_s is not None

    def as_dict(self) -> dict:
        """The dict Train hands each worker (not a deep copy: meta.json is shared, not duplicated)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> LoopConfig:
        unknown = sorted(set(values) - {field.name for field in fields(cls)})
        if unknown:
            raise TypeError(f"train_loop_config keys {unknown} are not LoopConfig fields")
        return cls(**values)
