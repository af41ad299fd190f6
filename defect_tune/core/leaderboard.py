"""A sweep's leaderboard: one row per trial, best first, from Tune's results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from defect_tune.core.config import selection_metric
from defect_tune.core.errors import UserError

# How a trial ended (the leaderboard's stop_reason), in the order tables and legends list them,
# with the words the console and the report both use for it.
STOP_REASONS = {"completed": "completed", "early_stopping": "early-stopped", "asha": "stopped by ASHA",
                "time_budget": "cut off by the time budget", "error": "failed", "no_result": "no epoch finished"}


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def python_value(value):
    """numpy/pandas scalars to Python; a missing value (NaN, pandas' NA: e.g. a parameter this
    trial's branch did not sample) to None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if value is pd.NA else _clean(value)


# Leaderboard columns that hold paths (the second: a JSON list of them), kept relative to the results folder.
PATH_COLUMNS = ("checkpoint", "fold_predictions")


def in_results(path, results: Path):
    """`path` as a results folder records it: relative to the folder when it lies inside it, so
    that the folder can be moved or copied whole; otherwise (a URI, another folder) as it is."""
    if path is None or "://" in str(path):
        return path
    try:
        return str(Path(path).absolute().relative_to(Path(results).absolute()))
    except ValueError:
        return str(path)


# Columns a leaderboard written by an earlier version names otherwise, by their current names.
RENAMED_COLUMNS = {"seed_point": "starting_point"}


def read_leaderboard(path: Path) -> pd.DataFrame:
    """`leaderboard.parquet` as this version names its columns, whichever version wrote it."""
    board = pd.read_parquet(path)
    return board.rename(columns={old: new for old, new in RENAMED_COLUMNS.items() if old in board and new not in board})


def from_results(path, results: Path):
    """A path a results folder recorded, usable from here: a relative one lies in `results`."""
    if path is None or "://" in str(path) or Path(path).is_absolute():
        return path
    return str(Path(results) / path)


def paths_in_results(board: pd.DataFrame, results: Path) -> pd.DataFrame:
    """The leaderboard with its path columns relative to `results` where they lie inside it."""
    import json

    board = board.copy()
    if "checkpoint" in board:
        board["checkpoint"] = [in_results(_clean(p), results) for p in board["checkpoint"]]
    if "fold_predictions" in board:
        board["fold_predictions"] = [None if _clean(files) is None
                                     else json.dumps([in_results(f, results) for f in json.loads(files)])
                                     for files in board["fold_predictions"]]
    return board


def prediction_files(row, results: Path) -> list[str]:
    """A leaderboard row's validation predictions at its best epoch, usable from here: under --cv
    every fold's held-out file, otherwise the one in its checkpoint; none without a checkpoint."""
    import json

    from defect_tune.core.config import PREDICTIONS_FILE

    folds, checkpoint = _clean(row.get("fold_predictions")), _clean(row.get("checkpoint"))
    files = (json.loads(folds) if folds
             else ([f"{str(checkpoint).rstrip('/')}/{PREDICTIONS_FILE}"] if checkpoint else []))
    return [from_results(file, results) for file in files]


def ranked_by(table: pd.DataFrame, objective: str) -> str:
    """The column to rank a trial's epochs or a sweep's trials by: the selection score (the
    objective, ties broken by AP) where the table has it; sweeps from before it, by the objective."""
    column = selection_metric(objective)
    return column if column in table else objective


# What a trial's model costs, by leaderboard column (training/cost.py measures them once per
# trial; memory is its peak over epochs): the cost in words, and its label in a table. A space's
# trade_offs, export's limits and the report take their costs from here.
COSTS = {
    "cost/params": ("parameters", "params (M)"),
    "cost/gflops_per_image": ("GFLOPs per image", "GFLOPs / image"),
    "cost/latency_ms_b1": ("milliseconds per image at batch 1", "ms / image, batch 1"),
    "cost/latency_ms_b32": ("milliseconds per image at batch 32", "ms / image, batch 32"),
    "cost/peak_memory_mb": ("peak training memory (MB)", "peak training MB"),
}


# ---------------------------------------------------------------- ranking trials: `export` and the sweep's best


class RankingError(UserError):
    """A leaderboard from which no trial can be picked as asked; the message names the file."""


# The cost columns `export` can limit, with the option that limits each and how it is shown.
LIMITS = {column: (option, COSTS[column][0]) for column, option in (("cost/latency_ms_b1", "--max-latency-ms"),
                                                                     ("cost/params", "--max-params"))}


def _within(usable: pd.DataFrame, limits: dict[str, float], where: Path) -> pd.DataFrame:
    """The trials that meet every limit; an error naming the closest trial when none does."""
    for column in limits:
        if column not in usable.columns or pd.to_numeric(usable[column], errors="coerce").isna().all():
            raise RankingError(f"{where}: no {column!r} column; {LIMITS[column][0]} needs a sweep that measured costs "
                              "(defect-tune search from this version on)")
    excess = pd.concat([pd.to_numeric(usable[c], errors="coerce") / limit for c, limit in limits.items()],
                       axis=1).max(axis=1)
    meeting = usable[excess <= 1.0]
    if meeting.empty and len(usable):
        closest = usable.loc[excess.idxmin()]
        asked = ", ".join(f"{LIMITS[c][0]} {limit:g}" for c, limit in limits.items())
        has = ", ".join(f"{LIMITS[c][1]} {python_value(closest[c]):.4g}" for c in limits)
        raise RankingError(f"{where}: no trial meets {asked}; the closest is trial {closest['trial_id']} with {has}")
    return meeting


def passed_over(board: pd.DataFrame, metric: str) -> pd.Series:
    """Why each trial cannot be exported, by row (NaN where it can): one that ended in error, or
    that has a non-finite `metric` or no best epoch, has nothing to hand on."""
    board = board.reset_index(drop=True)  # one row per label, so each reason is one value
    values = pd.to_numeric(board[metric], errors="coerce").astype("float64")  # pandas' NA as NaN
    epochs = pd.to_numeric(board["best_epoch"], errors="coerce").astype("float64")
    why = pd.Series(np.nan, index=board.index, dtype=object)
    why[board["status"] == "error"] = "ended in error"
    bad_value = why.isna() & ~np.isfinite(values)
    why[bad_value] = [f"{metric} is {board.at[i, metric]}" for i in why.index[bad_value]]
    bad_epoch = why.isna() & ~(np.isfinite(epochs) & (epochs >= 1))
    why[bad_epoch] = [f"best_epoch is {board.at[i, 'best_epoch']}" for i in why.index[bad_epoch]]
    return why


def _listed(board: pd.DataFrame, passed: pd.Series, most: int = 5) -> str:
    shown = [f"trial {board.at[index, 'trial_id']} ({reason})" for index, reason in passed.head(most).items()]
    return ", ".join(shown) + (f" and {len(passed) - most} more" if len(passed) > most else "")


def pick(board: pd.DataFrame, metric: str, mode: str, rank: int, where: Path,
         limits: dict[str, float] | None = None) -> pd.Series:
    """The `rank`-th best trial by `metric` among trials that finished an epoch without error,
    and that meet `limits` (a leaderboard cost column -> its largest allowed value)."""
    if metric not in board.columns:
        close = [c for c in board.columns if c.startswith(("val_", "param/"))]
        raise RankingError(f"{where}: no column {metric!r} in the leaderboard; columns include {', '.join(close)}")
    missing = [c for c in ("trial_id", "status", "stop_reason", "epochs", "best_epoch") if c not in board.columns]
    if missing:
        raise RankingError(f"{where}: no column(s) {missing}; not a leaderboard that `search` wrote")
    values = pd.to_numeric(board[metric], errors="coerce")
    if board[metric].notna().any() and values.isna().all():
        raise RankingError(f"{where}: column {metric!r} holds no numbers")
    usable = board[passed_over(board, metric).isna()]
    if limits:
        usable = _within(usable, limits, where)
    if rank < 1:
        raise RankingError(f"--rank {rank}: ranks start at 1 (the best trial)")
    if rank > len(usable):
        passed = passed_over(board, metric).dropna()
        why = f"; passed over: {_listed(board, passed)}" if len(passed) else ""
        raise RankingError(f"{where}: --rank {rank} asked for, but {len(usable)} trial(s) can be exported{why}")
    order = values[usable.index].sort_values(ascending=mode == "min", kind="stable").index
    return usable.loc[order].iloc[rank - 1]
