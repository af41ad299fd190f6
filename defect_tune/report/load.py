"""A sweep's results folder as the report reads it (`load_sweep`: sweep.json, the leaderboard, the
space, the trials' order), and the small formatters every section shares."""


from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from defect_tune.core.config import OBJECTIVE
from defect_tune.core.errors import UserError
from defect_tune.core.leaderboard import from_results, python_value, read_leaderboard
from defect_tune.core.units import clock

TOP_CONFIGS = 10  # rows of the per-class recall heatmap


FEW_TRIALS = 10  # complete trials below which importances get a warning


class ReportError(UserError):
    """A results folder that cannot be reported on; the message names the missing file."""


@dataclass
class Sweep:
    folder: Path
    summary: dict
    board: pd.DataFrame  # leaderboard order, best first
    objective: str
    mode: str
    max_epochs: int
    classes: list[str]
    params: list[str]  # sampled parameter names, without the "param/" prefix
    order_note: str | None = None  # why the trial order is a guess, when it is

    def in_start_order(self) -> pd.DataFrame:
        return self.board.sort_values("trial_index", kind="stable")


@dataclass
class Section:
    title: str
    caption: str = ""  # how to read the figure
    figure: Path | None = None
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why
    body: str = ""  # extra HTML (tables, numbers)


def load_sweep(results: Path) -> Sweep:
    results = Path(results)
    for name in ("leaderboard.parquet", "sweep.json"):
        if not (results / name).is_file():
            raise ReportError(f"{results / name}: not found; expected the results folder of a `defect-tune search`")
    try:
        summary = json.loads((results / "sweep.json").read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"{results / 'sweep.json'}: cannot be read ({error})") from None
    try:
        board = read_leaderboard(results / "leaderboard.parquet")
    except (OSError, ValueError) as error:
        raise ReportError(f"{results / 'leaderboard.parquet'}: cannot be read ({error})") from None
    if board.empty:
        raise ReportError(f"{results / 'leaderboard.parquet'}: the sweep recorded no trials, so there is nothing to "
                          "report")
    objective = summary.get("objective", OBJECTIVE)
    if objective not in board:
        raise ReportError(f"{results / 'leaderboard.parquet'}: no column {objective!r} (the objective in sweep.json)")
    classes = summary.get("classes") or [c.removeprefix("val_recall/") for c in board if c.startswith("val_recall/")]
    max_epochs = summary.get("max_epochs") or int(board["epochs"].max())
    params = [c.removeprefix("param/") for c in board if c.startswith("param/")]
    # Paths the sweep kept relative to its results folder (wherever the folder now is).
    summary = {**summary, **{key: from_results(summary.get(key), results) for key in ("experiment", "space")}}
    index, note = trial_indices(board, summary.get("experiment"))
    board = board.assign(trial_index=index)
    return Sweep(results, summary, board, objective, summary.get("mode", "max"), int(max_epochs), list(classes), params,
                 note)


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value)) or value is pd.NA


def metric_text(value) -> str:
    value = python_value(value)
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def count_text(value) -> str:
    """Epochs and ranks: whole numbers even from a float column (a column with gaps is float)."""
    value = python_value(value)
    return "–" if value is None else str(int(value))


def param_text(value) -> str:
    value = python_value(value)
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def duration_text(seconds) -> str:
    seconds = python_value(seconds)
    return "unknown" if seconds is None else clock(seconds)


def trial_indices(board: pd.DataFrame, experiment: str | None) -> tuple[list[int], str | None]:
    """Each trial's index in the order Tune started it, and a note when that order is a guess.

    The leaderboard records it (`trial_index`); for results folders without that
    column, older Tune ids end in the index (`abc12_00003`); current ones are bare (`7555c64f`), and the
    index is in the name of the trial's folder in the experiment (`run_trial_7555c64f_1_lr=...`).
    """
    if "trial_index" in board and board["trial_index"].notna().all():  # recorded by the leaderboard
        return [int(i) for i in board["trial_index"]], None
    ids = board["trial_id"].astype(str).tolist()
    suffixes = [re.search(r"_(\d+)$", i) for i in ids]
    if all(suffixes):
        return [int(m.group(1)) for m in suffixes], None
    folder = Path(experiment) if experiment and "://" not in experiment else None
    names = [p.name for p in folder.iterdir()] if folder is not None and folder.is_dir() else []
    found = {}
    for trial in ids:
        match = next((m for n in names if (m := re.search(rf"_{re.escape(trial)}_(\d+)(?:_|$)", n))), None)
        if match:
            found[trial] = int(match.group(1))
    if len(found) == len(ids):
        return [found[i] for i in ids], None
    where = (f"the Tune experiment {experiment} has no folder for {len(ids) - len(found)} of them" if names
             else f"the Tune experiment {experiment} is not a local folder here")
    position = {trial: k for k, trial in enumerate(sorted(ids))}
    return [position[i] for i in ids], (
        f"The order in which trials started is unknown ({where}), so trials are shown in trial-id order.")
