"""`defect-tune export`: one trial of a sweep, as everything a production retraining job needs."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from defect_tune.core.config import OBJECTIVE, OBJECTIVE_DEFINITION
from defect_tune.core.errors import UserError, file_in_the_way
from defect_tune.core.leaderboard import COSTS, from_results, plain, ranked_by

EXPORT_FORMAT = 1
PACKAGES = ("defect-tune", "torch", "torchvision", "timm", "ray", "optuna", "albumentations", "numpy", "pyarrow")


class ExportError(UserError):
    """A sweep result that cannot be exported; the message names the file."""


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


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
    try:
        board = pd.read_parquet(files["leaderboard.parquet"])
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ExportError(f"{files['leaderboard.parquet']}: not a readable Parquet file: {error}") from None
    return sweep, board, _read_json(files["trial_configs.json"])


# What `export` can cap, by leaderboard column: the option and the cost in words.
LIMITS = {column: (option, COSTS[column][0]) for column, option in (("cost/latency_ms_b1", "--max-latency-ms"),
                                                                     ("cost/params", "--max-params"))}


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


def _within(usable: pd.DataFrame, limits: dict[str, float], where: Path) -> pd.DataFrame:
    """The trials that meet every limit; an error naming the closest trial when none does."""
    for column in limits:
        if column not in usable.columns or pd.to_numeric(usable[column], errors="coerce").isna().all():
            raise ExportError(f"{where}: no {column!r} column; {LIMITS[column][0]} needs a sweep that measured costs "
                              "(defect-tune search from this version on)")
    excess = pd.concat([pd.to_numeric(usable[c], errors="coerce") / limit for c, limit in limits.items()], axis=1).max(axis=1)
    meeting = usable[excess <= 1.0]
    if meeting.empty and len(usable):
        closest = usable.loc[excess.idxmin()]
        asked = ", ".join(f"{LIMITS[c][0]} {limit:g}" for c, limit in limits.items())
        has = ", ".join(f"{LIMITS[c][1]} {plain(closest[c]):.4g}" for c in limits)
        raise ExportError(f"{where}: no trial meets {asked}; the closest is trial {closest['trial_id']} with {has}")
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


def pick(board: pd.DataFrame, metric: str, mode: str, rank: int, where: Path, limits: dict[str, float] | None = None) -> pd.Series:
    """The `rank`-th best trial by `metric` among trials that finished an epoch without error,
    and that meet `limits` (a leaderboard cost column -> its largest allowed value)."""
    if metric not in board.columns:
        close = [c for c in board.columns if c.startswith(("val_", "param/"))]
        raise ExportError(f"{where}: no column {metric!r} in the leaderboard; columns include {', '.join(close)}")
    missing = [c for c in ("trial_id", "status", "stop_reason", "epochs", "best_epoch") if c not in board.columns]
    if missing:
        raise ExportError(f"{where}: no column(s) {missing}; not a leaderboard that `search` wrote")
    values = pd.to_numeric(board[metric], errors="coerce")
    if board[metric].notna().any() and values.isna().all():
        raise ExportError(f"{where}: column {metric!r} holds no numbers")
    usable = board[passed_over(board, metric).isna()]
    if limits:
        usable = _within(usable, limits, where)
    if rank < 1 or rank > len(usable):
        passed = passed_over(board, metric).dropna()
        why = f"; passed over: {_listed(board, passed)}" if len(passed) else ""
        raise ExportError(f"{where}: --rank {rank} asked for, but {len(usable)} trial(s) can be exported{why}")
    order = values[usable.index].sort_values(ascending=mode == "min", kind="stable").index
    return usable.loc[order].iloc[rank - 1]


def build_export(results: Path, rank: int = 1, metric: str | None = None, mode: str | None = None,
                 limits: dict[str, float] | None = None) -> dict:
    """The export of the `rank`-th best trial (by `metric`, default the sweep's ranking) among
    those within `limits` (see `pick`)."""
    results = Path(results)
    sweep, board, configs = _read(results)
    metric = metric or ranked_by(board, sweep["objective"])
    objective = metric in (sweep["objective"], ranked_by(board, sweep["objective"]))
    mode = mode or (sweep["mode"] if objective else "min" if "loss" in metric else "max")
    row = pick(board, metric, mode, rank, results / "leaderboard.parquet", limits)
    trial_id = row["trial_id"]
    # Trials that finished yet cannot be ranked (a non-finite figure): named, never dropped unseen.
    passed = passed_over(board, metric)
    passed = passed[passed.notna() & (passed != "ended in error")]
    if trial_id not in configs:
        raise ExportError(f"{results / 'trial_configs.json'}: no config for trial {trial_id}")
    classes = sweep["classes"]
    thresholds = {c: plain(row.get(f"threshold/{c}")) for c in classes}
    missing = [c for c, t in thresholds.items() if t is None]
    if missing:
        raise ExportError(f"{results / 'leaderboard.parquet'}: trial {trial_id} has no learned threshold for {missing}")
    config = configs[trial_id]
    return {
        "format": EXPORT_FORMAT,
        "sweep": {
            "name": sweep["name"], "results": str(results.absolute()), "experiment": from_results(sweep["experiment"], results.absolute()),
            "space": from_results(sweep["space"], results.absolute()), "trial_id": trial_id, "rank": rank, "ranked_by": {"metric": metric, "mode": mode},
            "seed_point": plain(row.get("seed_point")), "stop_reason": row["stop_reason"], "limits": limits or {},
            "cost": {column.removeprefix("cost/"): plain(row[column]) for column in board.columns if column.startswith("cost/")},
            "epochs_run": int(row["epochs"]), "checkpoint": from_results(plain(row.get("checkpoint")), results.absolute()),
            "passed_over": {str(board.at[i, "trial_id"]): reason for i, reason in passed.items()},
        },
        "objective": {
            "name": OBJECTIVE, "mode": "max", "value": plain(row.get(OBJECTIVE)),
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
            "macro_precision": plain(row.get("val_macro_precision")), "macro_f2": plain(row.get("val_macro_f2")),
            "macro_ap": plain(row.get("val_macro_ap")),
            "recall": {c: plain(row.get(f"val_recall/{c}")) for c in classes},
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
        earlier = yaml.safe_load(out.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != EXPORT_FORMAT or "sweep" not in earlier:
        raise ExportError(f"{out}: exists and is not an earlier export; refusing to overwrite it (choose another --out)")


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
        export = yaml.safe_load(Path(path).read_text())
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
