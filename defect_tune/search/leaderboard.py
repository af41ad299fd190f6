"""Tune's results as the leaderboard: one row per trial (its sampled parameters, how it ended,
its best epoch's validation figures and costs), ranked. The leaderboard's columns and its
ranking rules live in `core.leaderboard`; this module alone reads `ray.tune.Result`s."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from defect_tune.core.config import OBJECTIVE, direction
from defect_tune.core.leaderboard import python_value, ranked_by
from defect_tune.raytrain.errors import error_reason


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
    # Imported here: it pulls in scipy, which the W&B actor (it imports stop_reason) need not load
    from defect_tune.core.metrics import wilson_interval

    sampled = {name: value for name, value in (result.config or {}).items() if not name.startswith("_")}
    history = result.metrics_dataframe
    metrics = result.metrics or {}
    row: dict = {"trial_id": metrics.get("trial_id") or (result.path or "").rsplit("_", 1)[-1]}
    # The order Tune started it in, from its folder name (`run_trial_<id>_<index>_...`).
    started = re.search(rf"_{re.escape(row['trial_id'])}_(\d+)(?:_|$)", Path(result.path or "").name)
    row["trial_index"] = int(started.group(1)) if started else None
    points = {tuple(sorted(p.items())): name for name, p in space.points}
    row["starting_point"] = points.get(tuple(sorted(sampled.items())))
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
        best = history.loc[(direction(space.mode) * history[rank]).idxmax()]
        row[key] = float(best[key])
        row[rank] = float(best[rank])
        row["best_epoch"] = int(best["epoch"])
        for column in dict.fromkeys((OBJECTIVE, f"{OBJECTIVE}_low", f"{OBJECTIVE}_high", "val_macro_precision",
                                     "val_macro_f2", "val_macro_ap", "val_macro_recall@0.5", "val_loss")):
            row[column] = python_value(best.get(column))
        for c in classes:
            row[f"val_recall/{c}"] = python_value(best.get(f"val_recall/{c}"))
        for c in classes:  # recalled of positives, and the Wilson interval of that proportion
            recalled, positives = (python_value(best.get(f"val_recalled/{c}")),
                                   python_value(best.get(f"val_positives/{c}")))
            row[f"val_recalled/{c}"], row[f"val_positives/{c}"] = recalled, positives
            interval = (wilson_interval(int(recalled), int(positives)) if recalled is not None and positives is not None
                        else None)
            row[f"val_recall_low/{c}"], row[f"val_recall_high/{c}"] = interval or (None, None)
        for c in classes:  # the best epoch's learned thresholds, which `export` hands to production
            row[f"threshold/{c}"] = python_value(best.get(f"threshold/{c}"))
        row["checkpoint"] = python_value(best.get("checkpoint_path"))  # the best epoch's, which Train keeps
        if "folds" in best:  # --cv: each fold's held-out predictions at that epoch, and the folds' spread
            row["folds"] = int(best["folds"])
            row["fold_predictions"] = python_value(best.get("fold_predictions"))
            row[f"{key}_fold_sd"] = python_value(best.get(f"{key}_fold_sd"))
        row["nodes"] = ",".join(sorted(set(history["node_id"].dropna()))) if "node_id" in history else None
        row["wall_seconds"] = float(history["time_total_s"].max())
        startup = [c for c in history if c.startswith("startup/")]  # trial start to first batch, in parts
        for column in (c for c in history if c.startswith("cost/")):  # measured once; memory: its peak over epochs
            row[column] = python_value(float(history[column].max()))
        row["startup_seconds"] = float(history[startup].iloc[0].sum()) if startup else None
    else:
        row[key] = None
    return row


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
