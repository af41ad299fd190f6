"""K-fold cross-validation over train+val for `search --cv K`; the test split is never read.

Folds are drawn by iterative stratification (Sechidis et al. 2011, iterstrat's
`MultilabelStratifiedKFold`) over the same groups `prepare` split by: duplicates and tiles of one
source image share a group and so a fold. Each fold is handed to a trial as a copy of meta.json
whose "train" and "val" splits are that fold's training and held-out parts (counts and positives
recomputed), plus a "fold" entry naming the held-out ids, so the training loop, class weights and
Ray Data ingest work on a fold as on `prepare`'s own split.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pyarrow.parquet as pq

from defect_tune.core.config import OBJECTIVE
from defect_tune.data.shards import DataError, data_location, filesystem_for

POOLED = ("train", "val")  # what folds are drawn from
FEW_POSITIVES = 5  # fewer validation positives than this in a class: one image moves its recall by 20 %+


def _pooled_rows(data_dir: str | os.PathLike, meta: dict) -> tuple[list[str], list[str], np.ndarray]:
    """ids, groups and labels (N, C) of every train and val image, read from the shards."""
    location = data_location(data_dir)
    filesystem, root = filesystem_for(location)
    shards = [f"{root}/{shard['file']}" for split in POOLED for shard in meta["splits"][split]["shards"]]
    try:
        table = pq.read_table(shards, columns=["id", "group", "labels"], filesystem=filesystem)
    except (OSError, ValueError) as error:
        raise DataError(f"{data_dir}: cannot read the train and val shards for --cv: {error}") from None
    labels = np.array(table.column("labels").to_pylist(), dtype=np.int64).reshape(-1, len(meta["classes"]))
    return table.column("id").to_pylist(), table.column("group").to_pylist(), labels


def make_folds(data_dir: str | os.PathLike, meta: dict, k: int, seed: int = 0) -> list[dict]:
    """K fold metas (see the module docstring), fold i holding out about 1/K of train+val.

    Raises DataError when train+val has fewer groups than folds.
    """
    # Imported here: it pulls in scikit-learn, which trials need not load
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if k < 2:
        raise ValueError(f"--cv needs at least 2 folds, got {k}")
    ids, groups, labels = _pooled_rows(data_dir, meta)
    names = sorted(set(groups))
    if len(names) < k:
        raise DataError(f"{data_dir}: train+val holds {len(names)} image groups, fewer than --cv {k} folds")
    index = {g: i for i, g in enumerate(names)}
    row_group = np.array([index[g] for g in groups])
    group_labels = np.zeros((len(names), labels.shape[1]), dtype=np.int64)
    np.maximum.at(group_labels, row_group, labels)
    # Defect-free groups as a column of their own, so they spread over the folds as evenly as classes.
    stratify = np.hstack([group_labels, (group_labels.sum(axis=1) == 0)[:, None].astype(np.int64)])
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    held_out_groups = [held for _, held in splitter.split(np.zeros((len(names), 1)), stratify)]
    folds = []
    for fold, held in enumerate(held_out_groups):
        held_rows = np.isin(row_group, held)
        folds.append(_fold_meta(meta, fold, k, seed, held_rows, ids, labels))
    return folds


def _counts(labels: np.ndarray, classes: list[str]) -> dict:
    return {"images": int(len(labels)),
            "positives": {c: int(labels[:, i].sum()) for i, c in enumerate(classes)},
            "defect_free": int((labels.sum(axis=1) == 0).sum()),
            "multi_label": int((labels.sum(axis=1) > 1).sum())}


def _fold_meta(meta: dict, fold: int, k: int, seed: int, held: np.ndarray, ids: list[str], labels: np.ndarray) -> dict:
    classes = meta["classes"]
    shards = [shard for split in POOLED for shard in meta["splits"][split]["shards"]]
    folded = copy.deepcopy(meta)
    folded["splits"]["train"] = {**_counts(labels[~held], classes), "shards": shards}
    folded["splits"]["val"] = {**_counts(labels[held], classes), "shards": shards}
    folded["fold"] = {"index": fold, "of": k, "seed": seed,
                      "val_ids": sorted(i for i, h in zip(ids, held, strict=True) if h)}
    return folded


def rare_classes(meta: dict, below: int = FEW_POSITIVES) -> dict[str, int]:
    """Classes with fewer than `below` positives in the validation split (and at least one image
    in train+val): their validation recall moves by 1/n when one image flips."""
    val = meta["splits"]["val"]["positives"]
    return {c: val[c] for c in meta["classes"] if val[c] < below
            and sum(meta["splits"][s]["positives"][c] for s in POOLED) > 0}


class FoldMean:
    """Turns the folds' per-epoch reports into the trial's: at epoch e, the mean across folds.

    An epoch is reported once every fold has reached it, so ASHA compares a trial's fold-mean at
    epoch e with other trials' fold-means at e. A fold that ended early (early stopping) carries
    its last epoch forward. After a restart, folds resume from their own checkpoints; an epoch
    some fold resumed past is skipped (it was reported before the restart).
    """

    def __init__(self, folds: int, objective: str):
        self.rows: list[dict[int, dict]] = [{} for _ in range(folds)]
        self.finished: set[int] = set()
        self.objective = objective
        self.reported = 0  # the last epoch handed on

    def add(self, fold: int, row: dict) -> None:
        self.rows[fold][int(row["epoch"])] = row

    def finish(self, fold: int) -> None:
        self.finished.add(fold)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.rows)

    def ready(self) -> list[dict]:
        """The epochs whose fold-mean can be reported now, in order."""
        out = []
        while (epoch := self._next()) is not None:
            if all(any(e <= epoch for e in rows) for rows in self.rows):
                out.append(self.mean(epoch))
            self.reported = epoch
        return out

    def _next(self) -> int | None:
        later = [min((e for e in rows if e > self.reported), default=None) for rows in self.rows]
        known = [e for e in later if e is not None]
        if not known:
            return None
        epoch = min(known)
        still_training = [f for f, rows in enumerate(self.rows)
                          if f not in self.finished and max(rows, default=0) < epoch]
        return None if still_training else epoch

    def mean(self, epoch: int) -> dict:
        rows = [rows[max(e for e in rows if e <= epoch)] for rows in self.rows]
        return fold_mean(rows, epoch, self.objective)


def fold_mean(rows: list[dict], epoch: int, objective: str) -> dict:
    """One report from the folds' reports at one epoch (see docs/guide.md, "Cross-validated trials").

    Numbers are averaged (thresholds too: the fold-averaged thresholds `export` hands on);
    recalled and positive counts are summed, since every train+val image is held out once, and
    each class's recall is recalled / positives over all of them; the objective is the folds'
    mean, its interval the mean's t-interval over folds, and each fold's value is kept; start-up
    is the slowest fold's.
    """
    from scipy import stats

    k = len(rows)
    out: dict = {"epoch": epoch, "folds": k}
    for key in dict.fromkeys(key for row in rows for key in row):
        present = [row[key] for row in rows if row.get(key) is not None]
        if (key in ("epoch", "checkpoint_path", "predictions_path", "best_epoch") or key.endswith(("_low", "_high"))
                or not present):
            continue  # intervals are the folds' own, recomputed below
        if key.startswith(("val_recalled/", "val_positives/")):
            out[key] = int(sum(present))
        elif key.startswith(("startup/", "cost/")) or key == "timestamp_s":  # the slowest, the largest
            out[key] = max(present)
        elif key == "trial_started_s":
            out[key] = min(present)
        elif key == "early_stopped":
            out[key] = all(bool(row.get(key)) for row in rows)
        elif isinstance(present[0], bool) or not isinstance(present[0], int | float):
            out[key] = ",".join(sorted({str(v) for v in present}))
        else:
            out[key] = float(np.mean(present))
    for key in [k for k in out if k.startswith("val_recalled/")]:  # per class: recall over all held-out images
        name, positives = key.removeprefix("val_recalled/"), out.get(key.replace("val_recalled/", "val_positives/"))
        if f"val_recall/{name}" in out and positives:
            out[f"val_recall/{name}"] = out[key] / positives
    for key in dict.fromkeys((OBJECTIVE, objective)):
        values = np.array([row[key] for row in rows], dtype=float)
        spread = float(values.std(ddof=1)) if k > 1 else 0.0
        half = float(stats.t.ppf(0.975, k - 1)) * spread / np.sqrt(k) if k > 1 else 0.0
        centre = float(values.mean())
        low, high = centre - half, centre + half
        if ((values >= 0) & (values <= 1)).all():  # a recall or precision: the interval stays in [0, 1]
            low, high = max(low, 0.0), min(high, 1.0)
        out.update({key: centre, f"{key}_low": low, f"{key}_high": high, f"{key}_fold_sd": spread})
        out.update({f"{key}/fold{f}": float(v) for f, v in enumerate(values)})
    out["fold_checkpoints"] = json.dumps([row.get("checkpoint_path") for row in rows])
    out["fold_predictions"] = json.dumps([row.get("predictions_path") for row in rows])  # kept for every epoch
    out["fold_epochs"] = json.dumps([int(row["epoch"]) for row in rows])
    if rows[0].get("checkpoint_path"):
        out["checkpoint_path"] = rows[0]["checkpoint_path"]
    return out
