"""A sweep's leaderboard: one row per trial, best first, from Tune's results."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from defect_tune.core.config import OBJECTIVE, selection_metric

STOP_REASONS = ("completed", "early_stopping", "asha", "time_budget", "error", "no_result")


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def plain(value):
    """numpy/pandas scalars to Python; NaN (e.g. a parameter this trial's branch did not sample) to None."""
    if hasattr(value, "item"):
        value = value.item()
    return _clean(value)


# The last line of a Python traceback: `package.module.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Loss|Exit|Interrupt)): (\S.*)$")


def error_reason(error: BaseException | str) -> str:
    """A failed trial's cause in one line, e.g. `NonFiniteLoss: epoch 1, batch 4: training loss
    is nan`: the innermost exception of the traceback Ray wraps it in (Tune's error.txt keeps the
    whole). Falls back to the error's own type and first line."""
    text = str(error)
    causes = [m for m in map(_EXCEPTION_LINE.match, (line.strip() for line in text.splitlines())) if m]
    if causes:
        name, message = causes[-1].groups()
    else:
        name = type(error).__name__ if isinstance(error, BaseException) else "Error"
        message = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{name}: {message}"[:500]


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
        board["fold_predictions"] = [None if _clean(files) is None else json.dumps([in_results(f, results) for f in json.loads(files)])
                                     for files in board["fold_predictions"]]
    return board


def prediction_files(row, results: Path) -> list[str]:
    """A leaderboard row's validation predictions at its best epoch, usable from here: under --cv
    every fold's held-out file, otherwise the one in its checkpoint; none without a checkpoint."""
    import json

    from defect_tune.core.config import PREDICTIONS_FILE

    folds, checkpoint = _clean(row.get("fold_predictions")), _clean(row.get("checkpoint"))
    files = json.loads(folds) if folds else ([f"{str(checkpoint).rstrip('/')}/{PREDICTIONS_FILE}"] if checkpoint else [])
    return [from_results(file, results) for file in files]


def ranked_by(table: pd.DataFrame, objective: str) -> str:
    """The column to rank a trial's epochs or a sweep's trials by: the selection score (the
    objective, ties broken by AP) where the table has it; sweeps from before it, by the objective."""
    column = selection_metric(objective)
    return column if column in table else objective


def stop_reason(epochs: int, max_epochs: int, early_stopped: bool, failed: bool, cut_off: bool = False) -> str:
    """Why a trial ended: an error, its epoch budget (`max_epochs`: the epochs this trial was to
    run, which a space that searches `epochs` sets per trial), its own early stopping, the
    sweep's time budget (`cut_off`: it was still running when that ran out), or ASHA, which
    stops a trial between epochs without telling it."""
    if failed:
        return "error"
    if cut_off and epochs < max_epochs and not early_stopped:
        return "time_budget"
    if epochs == 0:
        return "no_result"
    if epochs >= max_epochs:
        return "completed"
    return "early_stopping" if early_stopped else "asha"


def trial_row(result, space, classes: list[str], cut_off: frozenset[str] = frozenset()) -> dict:
    """One `ray.tune.Result` as a leaderboard row: sampled parameters, how the trial ended, and
    its best epoch's validation figures. `cut_off`: the trials the sweep's time budget ended."""
    from defect_tune.core.metrics import wilson_interval  # scipy: here, not for the W&B actor, which imports stop_reason

    sampled = {name: value for name, value in (result.config or {}).items() if not name.startswith("_")}
    history = result.metrics_dataframe
    metrics = result.metrics or {}
    row: dict = {"trial_id": metrics.get("trial_id") or (result.path or "").rsplit("_", 1)[-1]}
    # The order Tune started it in, from its folder name (`run_trial_<id>_<index>_...`).
    started = re.search(rf"_{re.escape(row['trial_id'])}_(\d+)(?:_|$)", Path(result.path or "").name)
    row["trial_index"] = int(started.group(1)) if started else None
    points = {tuple(sorted(p.items())): name for name, p in space.points}
    row["seed_point"] = points.get(tuple(sorted(sampled.items())))
    row.update({f"param/{k}": v for k, v in sampled.items()})
    # Our epoch, not Tune's training_iteration, which restarts at 1 when a trial resumes.
    epochs = int(history["epoch"].max()) if history is not None and "epoch" in history and len(history) else 0
    # A diverged trial (its training loss non-finite) ended itself with a report naming the loss,
    # which is what it failed of: it counts as failed everywhere a failed trial does.
    diverged = metrics.get("diverged") or None
    failed = result.error is not None or diverged is not None
    planned = metrics.get("planned_epochs", space.max_epochs)  # the trial's own epoch budget, as its worker reports it
    reason = stop_reason(epochs, planned, bool(metrics.get("early_stopped")), failed, row["trial_id"] in cut_off)
    row.update(status="error" if failed else "terminated", stop_reason=reason, epochs=epochs)
    row["error"] = diverged if result.error is None else error_reason(result.error)
    key = space.objective
    if epochs and key in history:
        rank = ranked_by(history, key)
        best = history.loc[history[rank].idxmax() if space.mode == "max" else history[rank].idxmin()]
        row[key] = float(best[key])
        row[rank] = float(best[rank])
        row["best_epoch"] = int(best["epoch"])
        for column in dict.fromkeys((OBJECTIVE, f"{OBJECTIVE}_low", f"{OBJECTIVE}_high", "val_macro_precision",
                                     "val_macro_f2", "val_macro_ap", "val_macro_recall@0.5", "val_loss")):
            row[column] = _clean(best.get(column))
        for c in classes:
            row[f"val_recall/{c}"] = _clean(best.get(f"val_recall/{c}"))
        for c in classes:  # recalled of positives, and the Wilson interval of that proportion
            recalled, positives = _clean(best.get(f"val_recalled/{c}")), _clean(best.get(f"val_positives/{c}"))
            row[f"val_recalled/{c}"], row[f"val_positives/{c}"] = recalled, positives
            interval = wilson_interval(int(recalled), int(positives)) if recalled is not None and positives is not None else None
            row[f"val_recall_low/{c}"], row[f"val_recall_high/{c}"] = interval or (None, None)
        for c in classes:  # the best epoch's learned thresholds, which `export` hands to production
            row[f"threshold/{c}"] = _clean(best.get(f"threshold/{c}"))
        row["checkpoint"] = _clean(best.get("checkpoint_path"))  # the best epoch's, which Train keeps
        if "folds" in best:  # --cv: each fold's held-out predictions at that epoch, and the folds' spread
            row["folds"] = int(best["folds"])
            row["fold_predictions"] = _clean(best.get("fold_predictions"))
            row[f"{key}_fold_sd"] = _clean(best.get(f"{key}_fold_sd"))
        row["nodes"] = ",".join(sorted(set(history["node_id"].dropna()))) if "node_id" in history else None
        row["wall_seconds"] = float(history["time_total_s"].max())
        startup = [c for c in history if c.startswith("startup/")]  # trial start to first batch, in parts
        for column in (c for c in history if c.startswith("cost/")):  # measured once; memory: its peak over epochs
            row[column] = _clean(float(history[column].max()))
        row["startup_seconds"] = float(history[startup].iloc[0].sum()) if startup else None
    else:
        row[key] = None
    return row


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


def build_leaderboard(results, space, classes: list[str], cut_off: frozenset[str] = frozenset()) -> pd.DataFrame:
    rows = [trial_row(result, space, classes, cut_off) for result in results]
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    ascending = space.mode == "min"
    board = board.sort_values(ranked_by(board, space.objective), ascending=ascending, na_position="last", kind="stable")
    # A failed trial ranks after every other, whatever its best epoch before it failed.
    board = board.sort_values("status", key=lambda status: status == "error", kind="stable").reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    return board
