"""`defect-tune export`: one trial of a sweep, as everything a production retraining job needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from defect_tune.core.config import OBJECTIVE, OBJECTIVE_DEFINITION, load_yaml
from defect_tune.core.errors import UserError, file_in_the_way
from defect_tune.core.leaderboard import (
    RankingError,
    from_results,
    passed_over,
    pick,
    python_value,
    ranked_by,
    read_leaderboard,
)
from defect_tune.core.versions import package_versions

EXPORT_FORMAT = 1


class ExportError(UserError):
    """A sweep result that cannot be exported; the message names the file."""


# The sweep.json keys read below. search.write_results writes them; test_production exports
# what write_results wrote, so a key dropped there fails that test rather than a user's export.
SWEEP_KEYS = ("name", "objective", "mode", "classes", "data", "experiment", "space")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not readable JSON: {error}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read(results: Path) -> tuple[dict, pd.DataFrame, dict]:
    files = {name: results / name for name in ("sweep.json", "leaderboard.parquet", "trial_configs.json")}
    for path in files.values():
        if not path.is_file():
            raise ExportError(f"{path}: not found; is {results} the results folder of a `defect-tune search`?")
    sweep = _read_json(files["sweep.json"])
    missing = [key for key in SWEEP_KEYS if key not in sweep]
    if missing:
        raise ExportError(f"{files['sweep.json']}: missing {missing}; not a sweep.json written by `defect-tune search`")
    if sweep["mode"] not in ("max", "min"):  # copied into the export, where retrain would rank by it
        raise ExportError(f"{files['sweep.json']}: mode {sweep['mode']!r} is neither max nor min")
    try:
        board = read_leaderboard(files["leaderboard.parquet"])
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ExportError(f"{files['leaderboard.parquet']}: not a readable Parquet file: {error}") from None
    return sweep, board, _read_json(files["trial_configs.json"])


def export_trial(results: Path, out: Path, rank: int = 1, metric: str | None = None, mode: str | None = None,
                 max_latency_ms: float | None = None, max_params: str | float | None = None) -> dict:
    """`defect-tune export`: the `rank`-th best trial among those within the cost limits (ms per
    image at batch 1, a parameter count such as "5M"), written to `out`; returns the export."""
    limits = {}
    if max_latency_ms is not None:
        if not (np.isfinite(max_latency_ms) and max_latency_ms > 0):
            raise ExportError(f"--max-latency-ms {max_latency_ms:g}: expected a positive number of milliseconds")
        limits["cost/latency_ms_b1"] = max_latency_ms
    if max_params is not None:
        limits["cost/params"] = parse_count(str(max_params))
    check_export_out(out)
    exported = build_export(results, rank, metric, mode, limits)
    write_export(exported, out)
    return exported


def parse_count(text: str) -> float:
    """`5M`, `500k`, `1.2e6` or `2500000` as a number.

    Raises:
        ExportError: anything else, or a count that is not positive."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text.strip()[-1:].lower(), 1.0)
    digits = text.strip()[:-1] if scale != 1.0 else text.strip()
    try:
        value = float(digits) * scale
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise ExportError(f"{text!r}: expected a positive count such as 5M, 500k or 2500000")
    return value


def build_export(results: Path, rank: int = 1, metric: str | None = None, mode: str | None = None,
                 limits: dict[str, float] | None = None) -> dict:
    """The export of the `rank`-th best trial (by `metric`, default the sweep's ranking) among
    those within `limits` (see `pick`)."""
    results = Path(results)
    sweep, board, configs = _read(results)
    metric = metric or ranked_by(board, sweep["objective"])
    objective = metric in (sweep["objective"], ranked_by(board, sweep["objective"]))
    mode = mode or (sweep["mode"] if objective else "min" if "loss" in metric else "max")
    try:
        row = pick(board, metric, mode, rank, results / "leaderboard.parquet", limits)
    except RankingError as error:
        raise ExportError(str(error)) from None
    trial_id = row["trial_id"]
    # Trials that finished yet cannot be ranked (a non-finite figure): named, never dropped unseen.
    passed = passed_over(board, metric)
    passed = passed[passed.notna() & (passed != "ended in error")]
    if trial_id not in configs:
        raise ExportError(f"{results / 'trial_configs.json'}: no config for trial {trial_id}")
    classes = sweep["classes"]
    thresholds = {c: python_value(row.get(f"threshold/{c}")) for c in classes}
    missing = [c for c, t in thresholds.items() if t is None]
    if missing:
        raise ExportError(f"{results / 'leaderboard.parquet'}: trial {trial_id} has no learned threshold for {missing}")
    config = configs[trial_id]
    return {
        "format": EXPORT_FORMAT,
        "sweep": {
            # Paths as the user named the results folder, never this machine's absolute ones.
            "name": sweep["name"], "results": str(results), "experiment": from_results(sweep["experiment"], results),
            "space": from_results(sweep["space"], results), "trial_id": trial_id, "rank": rank,
            "ranked_by": {"metric": metric, "mode": mode},
            "starting_point": python_value(row.get("starting_point")), "stop_reason": row["stop_reason"],
            "limits": limits or {},
            "cost": {column.removeprefix("cost/"): python_value(row[column])
                     for column in board.columns if column.startswith("cost/")},
            "epochs_run": int(row["epochs"]), "checkpoint": from_results(python_value(row.get("checkpoint")), results),
            "passed_over": {str(board.at[i, "trial_id"]): reason for i, reason in passed.items()},
        },
        "objective": {
            "name": OBJECTIVE, "mode": "max", "value": python_value(row.get(OBJECTIVE)),
            "precision_floor": config["precision_floor"], "definition": OBJECTIVE_DEFINITION,
        },
        "best_epoch": int(row["best_epoch"]),
        # A cross-validated sweep (--cv): the objective, best epoch and thresholds are fold-means,
        # each fold's thresholds learned on its own held-out part; retrain uses all of train+val.
        "cv": sweep.get("cv"),
        # Learned on validation at the best epoch by the config's threshold_rule: a probability at
        # or above a class's threshold means "defect present". Above 1 means "never predicted":
        # no threshold reached the precision floor on validation.
        "thresholds": thresholds,
        "validation": {
            "macro_precision": python_value(row.get("val_macro_precision")),
            "macro_f2": python_value(row.get("val_macro_f2")),
            "macro_ap": python_value(row.get("val_macro_ap")),
            "recall": {c: python_value(row.get(f"val_recall/{c}")) for c in classes},
        },
        "data": {"source_fingerprint": sweep.get("source_fingerprint"), "dir": sweep["data"], "classes": classes},
        "versions": sweep.get("versions") or package_versions(),
        "config": config,
    }


def check_export_out(out: Path) -> None:
    """Refuse an --out that is a folder or a file other than an earlier export (the sweep's own
    sweep.json, a leaderboard, a config a user wrote): writing there would destroy it."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: --out is a folder; name the export file to write, e.g. {out / 'best.yaml'}")
    if not out.exists():
        if (blocker := file_in_the_way(out)) is not None:
            raise ExportError(f"{out}: --out lies under {blocker}, which is a file")
        return
    try:
        earlier = load_yaml(out.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != EXPORT_FORMAT or "sweep" not in earlier:
        raise ExportError(f"{out}: exists and is not an earlier export; "
                          "refusing to overwrite it (choose another --out)")


def write_export(export: dict, out: Path) -> None:
    check_export_out(out)
    sweep = export["sweep"]
    header = (
        f"# defect-tune export: trial {sweep['trial_id']} (rank {sweep['rank']} by {sweep['ranked_by']['metric']}) "
        f"of sweep {sweep['name']}\n# retrain with: defect-tune retrain {out} --data DIR --out MODEL\n"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(header + yaml.safe_dump(export, sort_keys=False, width=120))


def read_export(path: Path) -> dict:
    try:
        export = load_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: not found") from None
    except yaml.YAMLError as error:
        raise ExportError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(export, dict) or export.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a `defect-tune export` file (format {EXPORT_FORMAT})")
    for key in ("config", "thresholds", "best_epoch", "data"):
        if key not in export:
            raise ExportError(f"{path}: missing {key!r}")
    return export
