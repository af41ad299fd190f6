"""What a sweep leaves in its results folder: the leaderboard, sweep.json, the best config and its
validation predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.table import Table

from defect_tune.core.config import PREDICTIONS_FILE
from defect_tune.core.leaderboard import (
    COSTS,
    RankingError,
    in_results,
    paths_in_results,
    pick,
    prediction_files,
    python_value,
    ranked_by,
    read_leaderboard,
)
from defect_tune.core.versions import package_versions
from defect_tune.search.console import _short
from defect_tune.search.options import SearchOptions
from defect_tune.search.records import OVERRIDES_RECORD
from defect_tune.search.searcher import SPACE_FILE
from defect_tune.search.space import SearchSpace, space_name


def keep_best_predictions(best, out: Path) -> dict | None:
    """Copies the best trial's validation predictions at its best epoch (its checkpoint's, or under
    --cv every fold's) into RESULTS/predictions/, so that the report draws its precision-recall
    curves from the results folder alone, without the Tune experiment's checkpoints. Returns what
    sweep.json records, or None where they are not on a local path."""
    sources = prediction_files(best, out)
    if not sources or any("://" in source or not Path(source).is_file() for source in sources):
        return None
    folder = out / "predictions" / str(best["trial_id"])
    folder.mkdir(parents=True, exist_ok=True)
    names = [PREDICTIONS_FILE] if len(sources) == 1 else [f"fold{k}.npz" for k in range(len(sources))]
    for source, name in zip(sources, names):
        shutil.copyfile(source, folder / name)
    return {"trial_id": str(best["trial_id"]), "files": [str((folder / name).relative_to(out)) for name in names]}


def write_results(out: Path, board, space: SearchSpace, options: SearchOptions, experiment: str, meta: dict,
                  seconds: float, free: dict, total: dict, cv: dict | None = None, gpu_memory: dict | None = None,
                  time_budget: dict | None = None, leftovers: int = 0) -> dict:
    """Write the sweep's results folder and return sweep.json's content: leaderboard.parquet and
    .csv (`board`), sweep.json (the space, options, data, resources at the end, versions, and
    `cv`, `gpu_memory`, `time_budget` where the sweep had them), trial_configs.json, a copy of the
    space, best_config.yaml and the best trial's validation predictions. `free`/`total`: the
    cluster's resources at the end and overall; `leftovers`: placement groups removed after it."""
    out.mkdir(parents=True, exist_ok=True)
    # Paths inside the results folder are kept relative to it, and the space is copied in: the
    # folder can be moved or copied to another machine, and report and export still find it all.
    board = paths_in_results(board, out)
    board.to_csv(out / "leaderboard.csv", index=False)
    board.to_parquet(out / "leaderboard.parquet", index=False)
    if Path(space.path).absolute() != (out / SPACE_FILE).absolute():
        shutil.copyfile(space.path, out / SPACE_FILE)
    summary = {
        # Paths as the user gave them, never this machine's absolute ones (the folder may move).
        "name": options.name, "space": SPACE_FILE, "space_source": space_name(space.path), "data": str(options.data),
        "source_fingerprint": meta.get("source_fingerprint"), "experiment": in_results(experiment, out),
        "objective": space.objective, "mode": space.mode,
        "trade_offs": [metric for metric, _ in space.trade_offs],  # what Optuna traded the objective against
        "ranked_by": ranked_by(board, space.objective),  # the objective, ties broken by validation AP
        "num_samples": space.num_samples if space.num_samples > 0 else None,  # None: until the time budget ran out
        "time_budget": time_budget,  # {"seconds", "cut_off": trial ids} of a sweep run with --time-budget
        "max_epochs": space.max_epochs, "fixed": space.fixed,  # the space's, with any key=value override applied
        "overrides": json.loads((out / OVERRIDES_RECORD).read_text()) if (out / OVERRIDES_RECORD).is_file() else {},
        "classes": meta["classes"], "trials": len(board), "seconds": round(seconds, 1),
        "cv": cv,  # {"folds", "seed"} of a cross-validated sweep
        "stop_reasons": board["stop_reason"].value_counts().to_dict() if len(board) else {},
        "resources_total": total, "resources_free_at_end": free, "versions": package_versions(),
        "placement_groups_removed_at_end": leftovers,  # left by Train runs whose trial was killed (wait_for_release)
        "worker": {"per_trial": options.workers_per_trial, "cpus": options.cpus_per_worker,
                   "gpus": options.gpus_per_worker},
        "gpu_memory": gpu_memory,  # what --trials-per-gpu auto measured
    }
    # Every trial's full training config, so `export --rank k` never needs the space file again.
    configs = {}
    for _, row in board.iterrows():
        sampled = {k.removeprefix("param/"): python_value(v) for k, v in row.items()
                   if k.startswith("param/") and python_value(v) is not None}
        configs[row["trial_id"]] = space.config_for(sampled).model_dump()
    (out / "trial_configs.json").write_text(json.dumps(configs, indent=2) + "\n")
    try:  # the trial `export` would pick: the best that finished an epoch without error
        best = pick(board, ranked_by(board, space.objective), space.mode, 1, out) if len(board) else None
    except RankingError:  # no such trial
        best = None
    if best is not None:
        sampled = {k.removeprefix("param/"): python_value(v) for k, v in best.items()
                   if k.startswith("param/") and python_value(v) is not None}
        config = space.config_for(sampled)
        header = (
            f"# best of sweep {options.name}: trial {best['trial_id']}, "
            f"{space.objective} = {best[space.objective]:.4f} at epoch {best['best_epoch']} of {best['epochs']}\n"
            f"# data {meta.get('source_fingerprint')}\n"
        )
        (out / "best_config.yaml").write_text(header + config.to_yaml())
        summary["best"] = {"trial_id": best["trial_id"], space.objective: float(best[space.objective]),
                           "best_epoch": int(best["best_epoch"]), "params": sampled}
        summary["best_predictions"] = keep_best_predictions(best, out)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def leaderboard_table(board, space: SearchSpace, top: int = 10) -> Table:
    table = Table(title=f"leaderboard (top {min(top, len(board))} of {len(board)})")
    columns = {"rank": "#", "trial_id": "trial", "starting_point": "starting point", "stop_reason": "stopped by",
               "epochs": "epochs", space.objective: "objective", "interval": "95% interval",
               "val_macro_precision": "macro precision",
               **{c: COSTS[c][1] for c in ("cost/params", "cost/latency_ms_b1") if c in board}}
    for label in columns.values():
        table.add_column(label, no_wrap=True)
    table.add_column("parameters")
    params = [c for c in board.columns if c.startswith("param/")]
    for _, row in board.head(top).iterrows():
        cells = []
        for column in columns:
            if column == "interval":  # the objective's bootstrap interval over validation images
                low, high = (python_value(row.get(f"{space.objective}_low")),
                             python_value(row.get(f"{space.objective}_high")))
                cells.append("-" if low is None or high is None else f"{low:.2f}-{high:.2f}")
                continue
            value = python_value(row.get(column))
            if column == "cost/params" and value is not None:
                value = value / 1e6
            cells.append("-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        sampled = {c.removeprefix("param/"): python_value(row[c]) for c in params if python_value(row[c]) is not None}
        table.add_row(*cells, _short(sampled))
    return table


def load_leaderboard(out: Path):
    return read_leaderboard(Path(out) / "leaderboard.parquet")
