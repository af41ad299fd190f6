"""`defect-tune report`: one sweep's results folder as a single self-contained HTML page.

Reads what `search` wrote (leaderboard.parquet, sweep.json, the best trial's validation
predictions) and draws one PNG per figure with matplotlib; the page embeds them as data URIs, so
report.html alone can be mailed or attached. Optuna's own analysis is reused where it reads well:
the finished trials are rebuilt into an in-memory Optuna study (ASHA-stopped trials as PRUNED,
as the sweep's searcher saw them) for `optuna.importance` and its parallel-coordinate plot.

Whatever cannot be drawn (one finished trial, predictions on remote storage, a class without
validation positives) becomes a sentence in the report saying why, never an exception.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import optuna
import pandas as pd
import yaml
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve

from defect_tune.core.config import OBJECTIVE, OBJECTIVE_DEFINITION, PREDICTIONS_FILE
from defect_tune.core.errors import UserError, file_in_the_way
from defect_tune.core.leaderboard import COSTS as COST_NAMES
from defect_tune.core.leaderboard import from_results, prediction_files
from defect_tune.search.ray_compat import optuna_contains
from defect_tune.search.space import SpaceError, load_space

TOP_CONFIGS = 10  # rows of the per-class recall heatmap
PARALLEL_PARAMS = 8  # axes of the parallel-coordinate plot; more are unreadable
IMPORTANCE_BARS = 15
FEW_TRIALS = 10  # complete trials below which importances get a warning
DPI = 110
FIGURE_FILES = ("history.png", "importances.png", "parallel_coordinates.png", "recall_per_class.png",
                "asha_savings.png", "precision_recall.png", "pareto.png", "learning_curves.png")
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False}
STOPS = {  # stop_reason: (legend label, colour), in the order legends list them
    "completed": ("ran every epoch", "#1f77b4"),
    "early_stopping": ("early stopping", "#2ca02c"),
    "asha": ("stopped by ASHA", "#ff7f0e"),
    "time_budget": ("cut off by the time budget", "#9467bd"),
    "error": ("error", "#d62728"),
    "no_result": ("no epoch finished", "#7f7f7f"),
}


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
        board = pd.read_parquet(results / "leaderboard.parquet")
    except (OSError, ValueError) as error:
        raise ReportError(f"{results / 'leaderboard.parquet'}: cannot be read ({error})") from None
    if board.empty:
        raise ReportError(f"{results / 'leaderboard.parquet'}: the sweep recorded no trials, so there is nothing to report")
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
    return Sweep(results, summary, board, objective, summary.get("mode", "max"), int(max_epochs), list(classes), params, note)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value)) or value is pd.NA


def _plain(value):
    """numpy scalars to Python, missing to None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if _missing(value) else value


def _metric(value) -> str:
    value = _plain(value)
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _count(value) -> str:
    """Epochs and ranks: whole numbers even from a float column (a column with gaps is float)."""
    value = _plain(value)
    return "–" if value is None else str(int(value))


def _param(value) -> str:
    value = _plain(value)
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds) -> str:
    seconds = _plain(seconds)
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


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


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


# Optuna ---------------------------------------------------------------------------------------

def _distribution(kind: str, values: tuple) -> optuna.distributions.BaseDistribution:
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(values))
    if kind in ("uniform", "loguniform"):
        return optuna.distributions.FloatDistribution(*values, log=kind == "loguniform")
    return optuna.distributions.IntDistribution(*values, log=kind == "int_log")


def _inferred(values: list) -> optuna.distributions.BaseDistribution:
    """A distribution that holds the values seen, when the search space file is gone."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return optuna.distributions.FloatDistribution(float(min(values)), float(max(values)))
    return optuna.distributions.CategoricalDistribution(sorted(set(values), key=str))


def _sampled(row: pd.Series, sweep: Sweep, space) -> dict:
    """The parameters this trial sampled. With the space at hand, a conditional choice whose
    value is None (e.g. focal_alpha: null) is told apart from one its branch never sampled."""
    if space is None:
        return {p: _plain(row.get(f"param/{p}")) for p in sweep.params if _plain(row.get(f"param/{p}")) is not None}
    sampled: dict = {}
    for p in space.params:
        if not p.active(sampled):
            continue
        value = _plain(row.get(f"param/{p.name}"))
        if p.kind == "choice":  # the choice itself: a column with gaps stores 16 as 16.0
            value = next((c for c in p.values if c == value and isinstance(c, bool) == isinstance(value, bool)), value)
        elif p.kind.startswith("int") and value is not None:
            value = int(value)
        if value is not None or (p.kind == "choice" and None in p.values):
            sampled[p.name] = value
    return sampled


def rebuild_study(sweep: Sweep) -> tuple[optuna.Study, list[str]]:
    """The sweep as an Optuna study, trials in the order they started, plus notes on what was
    approximated. Completed and early-stopped trials are COMPLETE, ASHA-stopped ones PRUNED with
    their best value as an intermediate value (as `AshaAwareOptunaSearch` told TPE), and so are
    those the time budget cut off; errors and trials without a value FAIL."""
    notes = []
    space_path = sweep.summary.get("space")
    try:
        space = load_space(Path(space_path)) if space_path else None
        if space is None:
            notes.append("sweep.json names no search space, so parameter distributions are inferred from the values tried.")
    except SpaceError as error:
        space = None
        notes.append(f"The search space could not be read ({error}), so parameter distributions are inferred from the values tried.")
    rows = [(row, _sampled(row, sweep, space)) for _, row in sweep.in_start_order().iterrows()]
    seen: dict[str, list] = {}
    for _, sampled in rows:
        for name, value in sampled.items():
            seen.setdefault(name, []).append(value)
    declared = {p.name: _distribution(p.kind, p.values) for p in space.params} if space else {}
    distributions = {}
    for name, values in seen.items():
        distribution = declared.get(name)
        if distribution is None or not all(optuna_contains(distribution, v) for v in values):
            if distribution is not None:
                notes.append(f"Values of {name} lie outside its distribution in {space_path} (was the file edited after the sweep?); its range is inferred from the values tried.")
            distribution = _inferred([v for v in values if v is not None] or [0.0])
        distributions[name] = distribution
    study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize", study_name=sweep.summary.get("name"))
    for row, sampled in rows:
        value, reason = _plain(row[sweep.objective]), row["stop_reason"]
        if value is None or reason in ("error", "no_result"):
            state, kwargs = optuna.trial.TrialState.FAIL, {}
        elif reason in ("asha", "time_budget"):
            epoch = _plain(row.get("best_epoch")) or _plain(row.get("epochs")) or 1
            state, kwargs = optuna.trial.TrialState.PRUNED, {"intermediate_values": {int(epoch): float(value)}}
        else:
            state, kwargs = optuna.trial.TrialState.COMPLETE, {"value": float(value)}
        study.add_trial(optuna.trial.create_trial(
            state=state, params=sampled, distributions={k: distributions[k] for k in sampled},
            user_attrs={"trial_id": str(row["trial_id"])}, **kwargs,
        ))
    return study, notes


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (PED-ANOVA) over the complete trials, or why there are none."""
    complete = _complete(study)
    others = len(study.trials) - len(complete)
    if len(complete) < 2:
        return {}, (f"No parameter importances: they compare trials that ran their full budget, and this sweep has "
                    f"{len(complete)} such trial{'s' if len(complete) != 1 else ''} ({others} other{'s were' if others != 1 else ' was'} "
                    "stopped by ASHA, failed or reported nothing). Run more trials.")
    if len({t.value for t in complete}) == 1:
        return {}, f"No parameter importances: all {len(complete)} trials that ran their full budget scored the same."
    varying = {name for name in {n for t in complete for n in t.params}
               if len({repr(t.params.get(name, "<unsampled>")) for t in complete}) > 1}
    if not varying:
        return {}, f"No parameter importances: the {len(complete)} trials that ran their full budget all used the same parameters."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA warns about small studies; the caption says so
        raw = optuna.importance.get_param_importances(study, params=sorted(varying), normalize=False)
    total = sum(raw.values())
    if total <= 0:  # Optuna would normalise this to equal shares, which reads as a finding
        return {}, (f"No parameter importances: PED-ANOVA tells no parameter apart among the {len(complete)} trials "
                    "that ran their full budget (too few trials, or too few per branch of the space).")
    return {name: value / total for name, value in raw.items()}, None


# Figures --------------------------------------------------------------------------------------

def history_figure(sweep: Sweep, path: Path) -> Path:
    ordered = sweep.in_start_order()
    x = ordered["trial_index"].to_numpy()
    y = pd.to_numeric(ordered[sweep.objective], errors="coerce").to_numpy(dtype=float)
    fig = Figure(figsize=(9, 4.6), layout="constrained")
    ax = fig.add_subplot()
    best = np.fmax.accumulate(np.where(np.isnan(y), -np.inf, y)) if sweep.mode == "max" else np.fmin.accumulate(np.where(np.isnan(y), np.inf, y))
    best[~np.isfinite(best)] = np.nan
    ax.step(x, best, where="post", color="#333333", lw=1.8, label="best so far", zorder=1)
    finite = y[np.isfinite(y)]
    floor = (finite.min() if len(finite) else 0.0) - 0.05 * (np.ptp(finite) if len(finite) > 1 else 1.0)
    for reason, (label, colour) in STOPS.items():
        mask = (ordered["stop_reason"] == reason).to_numpy()
        if not mask.any():
            continue
        if reason in ("error", "no_result"):
            ax.scatter(x[mask], np.full(mask.sum(), floor), marker="x", s=60, color=colour, label=f"{label} (no value)", zorder=3)
        else:
            hollow = reason in ("asha", "time_budget")
            ax.scatter(x[mask], y[mask], s=55, zorder=3, label=label, edgecolors=colour, linewidths=1.6,
                       facecolors="white" if hollow else colour)
    if len(finite):
        top = int(np.nanargmax(y) if sweep.mode == "max" else np.nanargmin(y))
        ax.annotate(f"best: {ordered['trial_id'].iloc[top]} ({y[top]:.4f})", (x[top], y[top]), xytext=(0, 12),
                    textcoords="offset points", ha="center", fontsize=10,
                    bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round,pad=0.25"})
        ax.margins(x=0.06, y=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in the order started)")
    ax.set_ylabel(sweep.objective)
    ax.set_title("Objective per trial and best so far")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def parallel_figure(study: optuna.Study, params: list[str], objective: str, path: Path) -> Path:
    import matplotlib.pyplot as plt  # Optuna draws on pyplot's current figure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, params=params, target_name=objective)
    fig = ax.figure
    try:
        fig.set_size_inches(min(13.0, max(8.0, 1.4 * len(params) + 4.0)), 5.5)
        ax.set_title("")  # Optuna's "Parallel Coordinate Plot", which would sit on top of ours
        ax.set_title(f"{objective} and the parameters of the trials that ran their full budget", loc="left", pad=16)
        # Optuna colours by "Blues", whose low end is white: the weakest trial's line would vanish.
        visible = ListedColormap(matplotlib.colormaps["Blues"](np.linspace(0.3, 1.0, 256)))
        for lines in ax.collections:
            lines.set_cmap(visible)
        # Optuna cuts names at 17 characters; put the full names back, slanted so they do not collide.
        full = {name if len(name) < 20 else f"{name[:17]}...": name for name in [objective, *params]}
        labels = [full.get(label.get_text(), label.get_text()) for label in ax.get_xticklabels()]
        ax.set_xticks(ax.get_xticks(), labels, rotation=20, ha="right", rotation_mode="anchor")
        return _save(fig, path)
    finally:
        plt.close(fig)


def importance_figure(values: dict[str, float], n_trials: int, path: Path) -> Path:
    names = list(values)[:IMPORTANCE_BARS][::-1]  # most important on top
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(names, [values[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.set_xlim(0, max(values.values()) * 1.18 or 1)
    ax.set_xlabel("importance (share of the total)")
    ax.set_title(f"Parameter importances (Optuna PED-ANOVA, {n_trials} trials)")
    return _save(fig, path)


def recall_figure(top: pd.DataFrame, sweep: Sweep, path: Path) -> Path:
    values = top[[f"val_recall/{c}" for c in sweep.classes]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    labels = [f"#{r} {t}  ({_metric(v)})" for r, t, v in zip(top["rank"], top["trial_id"], top[sweep.objective])]
    fig = Figure(figsize=(max(6.5, 0.95 * len(sweep.classes) + 3.5), max(3.4, 0.48 * len(top) + 1.9)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        text, colour = ("n/a", "#555555") if np.isnan(value) else (f"{value:.2f}", "white" if value < 0.6 else "black")
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
    ax.set_xticks(range(len(sweep.classes)), sweep.classes, rotation=30, ha="right")
    ax.set_yticks(range(len(top)), labels)
    ax.spines[:].set_visible(False)
    ax.set_title(f"Validation recall per class, top {len(top)} trials (objective in brackets)")
    fig.colorbar(image, ax=ax, label="recall", shrink=0.8)
    return _save(fig, path)


def savings_figure(sweep: Sweep, path: Path, saved_share: float) -> Path:
    ordered = sweep.in_start_order()
    x = np.arange(len(ordered))
    epochs = pd.to_numeric(ordered["epochs"], errors="coerce").fillna(0).to_numpy()
    fig = Figure(figsize=(min(12.0, max(7.0, 0.35 * len(ordered) + 4)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x, sweep.max_epochs, color="none", edgecolor="#bbbbbb", hatch="//", lw=0.8)
    colours = [STOPS.get(r, ("", "#7f7f7f"))[1] for r in ordered["stop_reason"]]
    ax.bar(x, epochs, color=colours)
    ax.axhline(sweep.max_epochs, color="#333333", ls="--", lw=1)
    handles = [Line2D([], [], color=STOPS[r][1], lw=8, label=STOPS[r][0]) for r in STOPS if (ordered["stop_reason"] == r).any()]
    handles.append(Patch(facecolor="none", edgecolor="#bbbbbb", hatch="//", label="epochs not run"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    step = max(1, math.ceil(len(ordered) / 24))
    ax.set_xticks(x[::step], ordered["trial_id"].astype(str).str.rsplit("_", n=1).str[-1].iloc[::step], rotation=90)
    ax.set_xlabel("trial (in the order started)")
    ax.set_ylabel("epochs run")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Epochs run per trial, of {sweep.max_epochs} each: {saved_share:.1%} of the full budget saved")
    return _save(fig, path)


def pr_figure(probs: np.ndarray, targets: np.ndarray, classes: list[str], thresholds: list, floor: float | None,
              title: str, path: Path) -> Path:
    columns = min(3, math.ceil(math.sqrt(len(classes))))
    rows = math.ceil(len(classes) / columns)
    fig = Figure(figsize=(4.3 * columns, 3.7 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(classes):
            ax.set_visible(False)
            continue
        y, p = targets[:, k], probs[:, k]
        if k + columns >= len(classes):  # the lowest panel of its column
            ax.set_xlabel("recall")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if y.sum() == 0:
            ax.set_title(f"{classes[k]}\nno positives")
            ax.text(0.5, 0.5, "no validation positives:\nno curve", ha="center", va="center", transform=ax.transAxes, color="#555555")
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", color="#1f77b4", lw=1.8)
        ax.axhline(y.mean(), color="#999999", ls=":", lw=1.2)
        if floor is not None:
            ax.axhline(floor, color="#d62728", ls="--", lw=1)
        ax.set_title(f"{classes[k]}\nAP {average_precision_score(y, p):.3f}, {int(y.sum())} positives")
        t = thresholds[k]
        if t is not None and t <= 1:
            predicted = p >= t
            hit = (predicted & (y == 1)).sum()
            ax.plot(hit / y.sum(), hit / max(predicted.sum(), 1), "o", ms=9, color="#d62728", mec="black", zorder=4)
            ax.annotate(f"t={t:.3g}", (hit / y.sum(), hit / max(predicted.sum(), 1)), xytext=(-8, -14),
                        textcoords="offset points", ha="right", fontsize=10)
        elif t is not None:
            ax.text(0.04, 0.12, "threshold above every score:\nnever predicted", transform=ax.transAxes, fontsize=10,
                    color="#d62728", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    handles = [Line2D([], [], color="#1f77b4", lw=1.8, label="precision-recall curve"),
               Line2D([], [], ls="none", marker="o", ms=9, color="#d62728", mec="black", label="exported threshold"),
               Line2D([], [], color="#999999", ls=":", label="prevalence (a random ranking)")]
    if floor is not None:
        handles.append(Line2D([], [], color="#d62728", ls="--", label=f"precision floor {floor:g}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2 if columns == 1 else 4), frameon=False)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


# Sections -------------------------------------------------------------------------------------

def tied_with_leader(board: pd.DataFrame, objective: str) -> pd.Series:
    """Per trial: is its objective inside the leader's 95 % interval (`<objective>_low` ..
    `_high`, bootstrap over validation images)? Then this split does not tell it from the leader.
    False for the leader itself and wherever the interval or the objective is missing."""
    low, high = f"{objective}_low", f"{objective}_high"
    values = pd.to_numeric(board.get(objective), errors="coerce") if objective in board else None
    if values is None or low not in board or not len(board) or pd.isna(values.iloc[0]):
        return pd.Series(False, index=board.index)
    lead_low, lead_high = _plain(board[low].iloc[0]), _plain(board[high].iloc[0])
    if lead_low is None or lead_high is None:
        return pd.Series(False, index=board.index)
    tied = values.between(lead_low, lead_high)
    tied.iloc[0] = False
    return tied.fillna(False)


# How the leaderboard shows each cost the sweep measured (core.leaderboard.COSTS): label, format.
_COST_FORMATS = {"cost/params": lambda v: f"{v / 1e6:.2f}", "cost/gflops_per_image": lambda v: f"{v:.3g}",
                 "cost/peak_memory_mb": lambda v: f"{v:.0f}"}
COSTS = {column: (label, lambda v, shown=_COST_FORMATS.get(column, lambda v: f"{v:.2f}"): "–" if _missing(v) else shown(v))
         for column, (_, label) in COST_NAMES.items()}


def leaderboard_section(sweep: Sweep) -> Section:
    text = {"trial_id": _metric, "seed_point": _metric, "stop_reason": lambda v: STOPS.get(v, (v,))[0]}
    numbers = {"rank": _count, "epochs": _count, sweep.objective: _metric, "val_macro_precision": _metric,
               **{column: shown for column, (_, shown) in COSTS.items() if column in sweep.board}}
    labels = {"rank": "#", "trial_id": "trial", "seed_point": "seed point", "stop_reason": "stopped by", "epochs": "epochs",
              sweep.objective: "objective", "interval": "95% interval", "tied": "vs leader",
              "val_macro_precision": "macro precision",
              **{column: label for column, (label, _) in COSTS.items() if column in sweep.board}}
    tied = tied_with_leader(sweep.board, sweep.objective)
    head = "".join(f"<th>{html.escape(labels[column])}</th>" for column in labels)
    head += "".join(f"<th class='param'>{html.escape(name)}</th>" for name in sweep.params)
    rows = []
    for index, row in sweep.board.iterrows():
        cells = []
        for column in labels:
            if column == "interval":
                low, high = _plain(row.get(f"{sweep.objective}_low")), _plain(row.get(f"{sweep.objective}_high"))
                shown = "–" if low is None or high is None else f"{low:.3f}–{high:.3f}"
            elif column == "tied":
                shown = "tied" if tied[index] else ""
            else:
                shown = (numbers.get(column) or text[column])(row.get(column))
            cells.append(f"<td{' class=num' if column in numbers or column == 'interval' else ''}>{html.escape(str(shown))}</td>")
        for name in sweep.params:
            value = row.get(f"param/{name}")
            title = " title='not sampled on this branch'" if _plain(value) is None else ""
            cells.append(f"<td{title}>{html.escape(_param(value))}</td>")
        best = " class='best'" if _plain(row.get("rank")) == 1 and _plain(row[sweep.objective]) is not None else ""
        rows.append(f"<tr{best}>{''.join(cells)}</tr>")
    body = f"<div class='scroll tall'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    caption = (f"Every trial, best {sweep.objective} first (the value at each trial's best epoch), with its 95 % bootstrap "
               "interval over the validation images. An ASHA-stopped trial's "
               "objective comes from fewer epochs than a full run's. Parameters shown as – were not sampled on that "
               "trial's branch of the search space.")
    section = Section("Leaderboard", caption, body=body)
    if tied.any():
        section.notes.append(
            f"{int(tied.sum())} trial(s) marked tied score inside the leader's 95 % interval: on this validation split "
            "they are not distinguishable from the winner. Prefer cross-validated figures (or more validation images) "
            "before promoting one over another."
        )
    return section


def pareto_front(board: pd.DataFrame, objective: str, mode: str, cost: str) -> pd.Series:
    """Per trial: is it on the front of `objective` against `cost` (lower is better)? A trial is,
    when no other trial is at least as good on both and better on one."""
    sign = 1.0 if mode == "max" else -1.0
    value = sign * pd.to_numeric(board[objective], errors="coerce")
    spent = pd.to_numeric(board[cost], errors="coerce")
    known = value.notna() & spent.notna()
    on = pd.Series(False, index=board.index)
    for index in board.index[known]:
        others = known & (board.index != index)
        dominated = others & (value >= value[index]) & (spent <= spent[index]) & ((value > value[index]) | (spent < spent[index]))
        on[index] = not dominated.any()
    return on


PARETO_COSTS = {column: words for column, (words, _) in COST_NAMES.items()}
DEFAULT_PARETO = ("cost/latency_ms_b1", "cost/params")  # drawn for every sweep that measured costs


def pareto_figure(sweep: Sweep, costs: list[str], path: Path) -> Path:
    fig = Figure(figsize=(6.2 * len(costs), 4.4), layout="constrained")
    board = sweep.board
    for k, cost in enumerate(costs):
        ax = fig.add_subplot(1, len(costs), k + 1)
        known = board[[sweep.objective, cost]].apply(pd.to_numeric, errors="coerce").notna().all(axis=1)
        rows = board[known]
        front = pareto_front(rows, sweep.objective, sweep.mode, cost)
        x = rows[cost].astype(float).to_numpy()
        y = rows[sweep.objective].astype(float).to_numpy()
        low = pd.to_numeric(rows.get(f"{sweep.objective}_low"), errors="coerce") if f"{sweep.objective}_low" in rows else None
        high = pd.to_numeric(rows.get(f"{sweep.objective}_high"), errors="coerce") if f"{sweep.objective}_high" in rows else None
        if low is not None and high is not None:
            spread = np.vstack([np.clip(y - low.to_numpy(), 0, None), np.clip(high.to_numpy() - y, 0, None)])
            ax.errorbar(x, y, yerr=np.nan_to_num(spread), fmt="none", ecolor="#bbbbbb", lw=1, zorder=1)
        ax.scatter(x[~front.to_numpy()], y[~front.to_numpy()], color="#9e9e9e", s=28, zorder=2, label="dominated")
        ax.scatter(x[front.to_numpy()], y[front.to_numpy()], color="#d62728", s=40, zorder=3, label="on the front")
        order = np.argsort(x[front.to_numpy()])
        ax.plot(x[front.to_numpy()][order], y[front.to_numpy()][order], color="#d62728", lw=1, zorder=2)
        labels: dict[tuple[float, float], list[str]] = {}  # trials tied on both share one label
        for (_, row), on in zip(rows.iterrows(), front):
            if on:
                labels.setdefault((float(row[cost]), float(row[sweep.objective])), []).append(str(row["trial_id"]))
        for point, ids in labels.items():
            ax.annotate(", ".join(ids), point, fontsize=8, xytext=(4, 4), textcoords="offset points")
        if len(x) and x.min() > 0 and x.max() / x.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(PARETO_COSTS[cost])
        ax.set_ylabel(sweep.objective)
        ax.legend(frameon=False, loc="lower right")
    fig.suptitle(f"{sweep.objective} against what it costs (red: no trial is better on both)")
    return _save(fig, path)


def pareto_section(sweep: Sweep, out: Path) -> Section | None:
    # The sweep's own trade-offs (a multi-objective sweep) first, then latency and size.
    wanted = dict.fromkeys([*(sweep.summary.get("trade_offs") or []), *DEFAULT_PARETO])
    costs = [c for c in wanted if c in PARETO_COSTS and c in sweep.board
             and pd.to_numeric(sweep.board[c], errors="coerce").notna().any()]
    if not costs:
        return None  # a sweep from before costs were measured
    section = Section("Objective against cost")
    section.caption = (f"Each point is a trial at its best epoch, with its 95 % interval; red points are the Pareto front: "
                       f"no other trial has a higher {sweep.objective} at a lower cost. Latency is the median of repeated "
                       "forward passes on the device the trial trained on (see the leaderboard for batch 32 and memory). "
                       "Pick from the front the cheapest trial whose interval overlaps the leader's, or use "
                       "`defect-tune export --max-latency-ms` / `--max-params`.")
    section.figure = pareto_figure(sweep, costs, out / "pareto.png")
    fronts = {cost: sweep.board.loc[pareto_front(sweep.board, sweep.objective, sweep.mode, cost), "trial_id"].tolist()
              for cost in costs}
    section.notes.append("; ".join(f"on the front against {PARETO_COSTS[c]}: {', '.join(map(str, ids))}" for c, ids in fronts.items()))
    return section


def history_section(sweep: Sweep, out: Path) -> Section:
    section = Section("Optimization history", notes=[sweep.order_note] if sweep.order_note else [])
    section.caption = ("Each point is one trial's objective, in the order trials started; the line is the best so far. "
                       "Filled points ran every epoch (or stopped by their own early stopping); hollow points were stopped "
                       "by ASHA, so their value comes from fewer epochs; crosses are trials that failed or reported nothing. "
                       "A line that keeps rising late means more trials would likely still help.")
    if sweep.board[sweep.objective].notna().any():
        section.figure = history_figure(sweep, out / "history.png")
    else:
        section.notes.append("No trial reported an objective value, so there is no history to draw.")
    return section


def importance_section(study: optuna.Study, values: dict, reason: str | None, out: Path) -> Section:
    n = len(_complete(study))
    section = Section("Parameter importances", notes=[reason] if reason else [])
    section.caption = (f"Optuna's default importance (PED-ANOVA, optuna.importance.get_param_importances) over the {n} "
                       "trials that ran their full budget: how differently each parameter is distributed among the best of "
                       "them than among all of them, as a share of the total. It says which parameters mattered in this "
                       "sweep, not in which direction (see the parallel coordinates for that). With few trials, read it "
                       "as a hint: a couple of trials more can reorder it.")
    if values:
        section.figure = importance_figure(values, n, out / "importances.png")
        if n < FEW_TRIALS:
            section.notes.append(f"Only {n} trials ran their full budget: PED-ANOVA compares the best tenth of them with "
                                 "the rest, so with this few the shares below are closer to noise than to a finding.")
    if len(values) > IMPORTANCE_BARS:
        rest = list(values)[IMPORTANCE_BARS:]
        section.notes.append(f"The figure shows the {IMPORTANCE_BARS} most important parameters; the other {len(rest)} "
                             f"({', '.join(rest)}) share {sum(values[r] for r in rest):.2f} of the total.")
    return section


def parallel_section(sweep: Sweep, study: optuna.Study, ranked: list[str], out: Path) -> Section:
    section = Section("Parameters vs objective")
    section.caption = ("Optuna's parallel-coordinate plot: one line per trial that ran its full budget, from its objective "
                       "(left axis) through its parameter values; darker lines scored higher. Bands where the dark lines "
                       "gather are the values worth keeping. 'None' on an axis marks trials whose branch of the space did "
                       "not sample that parameter. ASHA-stopped trials are left out, their objective comes from fewer epochs.")
    complete = _complete(study)
    if len(complete) < 2:
        section.notes.append(f"No parallel coordinates: {len(complete)} trial{'s' if len(complete) != 1 else ''} ran its full "
                             "budget, and a single line (or none) shows nothing about the parameters.")
        return section
    present = [p for p in ranked if any(p in t.params for t in complete)]
    if not present:
        section.notes.append("The trials that ran their full budget sampled no parameters.")
        return section
    if len(present) > PARALLEL_PARAMS:
        section.notes.append(f"Only the {PARALLEL_PARAMS} most important of {len(present)} parameters are drawn; the leaderboard has them all.")
    section.figure = parallel_figure(study, present[:PARALLEL_PARAMS], sweep.objective, out / "parallel_coordinates.png")
    return section


def recall_section(sweep: Sweep, out: Path) -> Section:
    section = Section("Per-class recall of the top configurations")
    section.caption = ("Validation recall per class (columns) of the best trials (rows, best first), at the thresholds each "
                       "trial learned (precision at least the floor). A macro average hides a class the model misses: look "
                       "for dark columns. Grey 'n/a' cells are classes without validation positives.")
    columns = [f"val_recall/{c}" for c in sweep.classes]
    missing = [c for c in columns if c not in sweep.board]
    finished = sweep.board[sweep.board[sweep.objective].notna()]
    if missing:
        section.notes.append(f"The leaderboard has no per-class recall ({', '.join(missing)} missing).")
    elif finished.empty:
        section.notes.append("No trial reported an objective value, so there is no per-class recall.")
    else:
        section.figure = recall_figure(finished.head(TOP_CONFIGS), sweep, out / "recall_per_class.png")
    return section


def savings(sweep: Sweep) -> dict:
    """Epochs run against what running every trial for max_epochs would cost, per stop reason."""
    epochs = pd.to_numeric(sweep.board["epochs"], errors="coerce").fillna(0)
    full = len(sweep.board) * sweep.max_epochs
    by_reason = {}
    for reason, group in epochs.groupby(sweep.board["stop_reason"]):
        by_reason[reason] = {"trials": len(group), "run": int(group.sum()), "saved": int(len(group) * sweep.max_epochs - group.sum())}
    run = int(epochs.sum())
    return {"run": run, "full": full, "saved": full - run, "share": (full - run) / full if full else 0.0, "by_reason": by_reason}


def savings_section(sweep: Sweep, out: Path) -> Section:
    numbers = savings(sweep)
    asha = numbers["by_reason"].get("asha", {"trials": 0, "saved": 0})
    section = Section("ASHA's savings")
    section.caption = ("Each bar is the epochs one trial ran; the hatched part up to the dashed line is what running it for "
                       "the full budget would have added. ASHA stops the trials that trail at each rung, so the budget goes "
                       "to the promising ones.")
    if not numbers["full"]:
        section.notes.append("The sweep has no trials or no epoch budget, so there are no savings to count.")
        return section
    rows = "".join(
        f"<tr><td>{html.escape(STOPS.get(r, (r,))[0])}</td><td class='num'>{v['trials']}</td><td class='num'>{v['run']}</td>"
        f"<td class='num'>{v['saved']}</td></tr>"
        for r, v in sorted(numbers["by_reason"].items(), key=lambda item: list(STOPS).index(item[0]) if item[0] in STOPS else 99)
    )
    section.body = (
        f"<p class='numbers'>The sweep ran <b>{numbers['run']}</b> of the <b>{numbers['full']}</b> epochs that "
        f"{len(sweep.board)} trials × {sweep.max_epochs} epochs would take: <b>{numbers['share']:.1%} saved</b>. "
        f"ASHA stopped {asha['trials']} trial{'s' if asha['trials'] != 1 else ''} early, saving {asha['saved']} epochs "
        f"({asha['saved'] / numbers['full']:.1%} of the full budget).</p>"
        "<table class='small'><thead><tr><th>stopped by</th><th>trials</th><th>epochs run</th><th>epochs not run</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    section.figure = savings_figure(sweep, out / "asha_savings.png", numbers["share"])
    return section


def study_curves(sweep: Sweep) -> tuple[dict[int, dict[int, float]], dict[int, str]] | None:
    """Each trial's value per epoch and its state, from the study the sweep kept (optuna.db), by
    Optuna trial number; None for a sweep without one (older, or run with several objectives,
    whose study holds no per-epoch values)."""
    path = sweep.folder / "optuna.db"
    if not path.is_file():
        return None
    study = optuna.load_study(study_name=str(sweep.summary.get("name")), storage=f"sqlite:///{path}")
    if len(study.directions) > 1:
        return None
    curves = {t.number: dict(sorted(t.intermediate_values.items())) for t in study.trials if t.intermediate_values}
    return curves, {t.number: t.state.name for t in study.trials}


def asha_cutoffs(curves: dict[int, dict[int, float]], grace: int, factor: float, max_epochs: int, mode: str) -> dict[int, float]:
    """At each of ASHA's rungs (grace, grace·factor, ... below max_epochs), the value a trial had to
    reach there to go on: the top 1/factor of the values recorded at that rung, as ASHA keeps it
    (a trial judged early saw fewer values; this is the cut-off over the whole sweep)."""
    cutoffs = {}
    rung = grace
    while rung < max_epochs:
        values = np.array([curve[rung] for curve in curves.values() if rung in curve], dtype=float)
        if len(values):
            quantile = (1 - 1 / factor) * 100 if mode == "max" else 100 / factor
            cutoffs[rung] = float(np.nanpercentile(values, quantile))
        rung = int(round(rung * factor))
    return cutoffs


def curves_figure(curves: dict, states: dict, cutoffs: dict, sweep: Sweep, path: Path) -> Path:
    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for number, curve in curves.items():
        pruned = states.get(number) == "PRUNED"
        ax.plot(list(curve), list(curve.values()), color=STOPS["asha" if pruned else "completed"][1], alpha=0.75, lw=1.2,
                ls="--" if pruned else "-", marker="o", ms=3)
    for rung, cutoff in cutoffs.items():
        ax.axvline(rung, color="#bbbbbb", lw=0.8, zorder=0)
        ax.plot([rung], [cutoff], marker="_", ms=22, mew=2.5, color="#333333", zorder=5)
    handles = [Line2D([], [], color=STOPS["completed"][1], label="ran on"), Line2D([], [], color=STOPS["asha"][1], ls="--",
                                                                                        label="stopped by ASHA"),
               Line2D([], [], color="#333333", marker="_", ms=14, mew=2.5, ls="none", label="cut-off at the rung")]
    ax.legend(handles=handles, frameon=False, loc="lower right")
    ax.set_xlabel("epoch (Tune's iteration)")
    ax.set_ylabel(f"{sweep.objective} (ties broken by AP)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Each trial's objective per epoch, with ASHA's rungs")
    return _save(fig, path)


def curves_section(sweep: Sweep, out: Path) -> Section | None:
    found = study_curves(sweep)
    if found is None:
        return None
    curves, states = found
    section = Section("Learning curves")
    section.caption = ("One line per trial, its objective at every epoch, from the study the sweep kept (optuna.db). The grey "
                       "lines are ASHA's rungs; the black mark on each is the value a trial needed there to go on (the top "
                       "1/reduction-factor of the values recorded at that rung). Dashed trials were stopped by ASHA.")
    if not curves:
        section.notes.append("The study holds no per-epoch values (no trial finished an epoch).")
        return section
    space = sweep.summary.get("space")
    try:
        loaded = load_space(Path(space)) if space else None
    except SpaceError:
        loaded = None
    cutoffs = {}
    if loaded is not None:
        cutoffs = asha_cutoffs(curves, loaded.grace_period, loaded.reduction_factor, sweep.max_epochs, sweep.mode)
        section.notes.append("ASHA's cut-offs: " + (", ".join(f"epoch {r}: {v:.4f}" for r, v in cutoffs.items()) or "no rung below the epoch budget") + ".")
    else:
        section.notes.append("The search space is not at hand, so ASHA's rungs are not drawn.")
    section.figure = curves_figure(curves, states, cutoffs, sweep, out / "learning_curves.png")
    return section


def _predictions_path(sweep: Sweep, file: str) -> tuple[Path | None, str | None]:
    """A local path to a predictions file (`<checkpoint>/val_predictions.npz`), or why there is none."""
    text = str(file)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        return None, (f"No precision-recall curves: the best trial's predictions are on remote storage ({text}), and the "
                      "report reads local files only. Copy them next to the results and point the leaderboard's "
                      f"checkpoint column (the folder that holds {PREDICTIONS_FILE}) or, after --cv, its fold_predictions "
                      "column (the files) at the copy, or run the report where the storage is mounted.")
    path = Path(text)
    if path.is_file():
        return path, None
    experiment = str(sweep.summary.get("experiment", ""))
    where = f" (the sweep's storage is {experiment}; run the report where that is reachable)" if "://" in experiment else ""
    return None, f"No precision-recall curves: {path} not found{where}."


def pr_section(sweep: Sweep, out: Path) -> Section:
    section = Section("Precision-recall curves of the best trial")
    section.caption = ("One panel per class, from the best trial's validation predictions at its best epoch. The red dot is "
                       "where the threshold that defect-tune export hands to production sits on the curve; the dashed line is the "
                       "precision floor the objective guards (recall only counts above it); the dotted line is what a "
                       "random ranking would reach. A curve that stays high further right is a better classifier for that class.")
    finished = sweep.board[sweep.board[sweep.objective].notna()]
    if finished.empty:
        section.notes.append("No trial reported an objective value, so there is no best trial.")
        return section
    best = finished.iloc[0]
    kept = sweep.summary.get("best_predictions") or {}
    if kept.get("trial_id") == best["trial_id"]:  # copied into the results folder by the sweep
        files = [from_results(file, sweep.folder) for file in kept["files"]]
    else:  # a cross-validated trial: every fold's held-out predictions, so each train+val image once
        files = prediction_files(best, sweep.folder)
    if not files:
        section.notes.append(f"No precision-recall curves: the best trial {best['trial_id']} recorded no checkpoint.")
        return section
    parts = []
    for file in files:
        path, problem = _predictions_path(sweep, file)
        if problem:
            section.notes.append(problem)
            return section
        with np.load(path, allow_pickle=False) as data:
            parts.append((np.asarray(data["probs"], dtype=float), np.asarray(data["targets"])))
            classes = [str(c) for c in data["classes"]] if "classes" in data else list(sweep.classes)
    probs, targets = np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    if probs.ndim != 2 or probs.shape != targets.shape or probs.shape[1] != len(classes):
        section.notes.append(f"No precision-recall curves: {path} holds probs {probs.shape} and targets {targets.shape} "
                             f"for {len(classes)} classes, which do not match.")
        return section
    thresholds = [_plain(best.get(f"threshold/{c}")) for c in classes]
    empty = [c for k, c in enumerate(classes) if targets[:, k].sum() == 0]
    if empty:
        section.notes.append(f"No curve for {', '.join(empty)}: no positives among the {len(targets)} validation images.")
    if all(t is None for t in thresholds):
        section.notes.append("The leaderboard has no exported thresholds (threshold/<class> columns), so no operating points are marked.")
    held_out = f"held-out images of {len(files)} folds" if len(files) > 1 else "validation images"
    title = f"Trial {best['trial_id']} (rank {_count(best.get('rank'))}), epoch {_count(best.get('best_epoch'))}: {len(targets)} {held_out}"
    section.figure = pr_figure(probs, targets, classes, thresholds, _precision_floor(sweep), title, out / "precision_recall.png")
    return section


def _precision_floor(sweep: Sweep) -> float | None:
    """The best trial's precision floor, from the config `search` wrote for it."""
    path = sweep.folder / "best_config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    floor = config.get("precision_floor") if isinstance(config, dict) else None
    return float(floor) if isinstance(floor, int | float) else None


def errors_section(sweep: Sweep) -> Section | None:
    failed = sweep.board[sweep.board["stop_reason"].isin(["error", "no_result"])]
    if failed.empty:
        return None
    rows = "".join(
        f"<tr><td>{html.escape(str(row['trial_id']))}</td><td>{html.escape(STOPS.get(row['stop_reason'], (row['stop_reason'],))[0])}</td>"
        f"<td class='error'>{html.escape(str(_plain(row.get('error')) or 'no epoch finished and no error was recorded'))}</td></tr>"
        for _, row in failed.iterrows()
    )
    body = f"<table class='small'><thead><tr><th>trial</th><th>stopped by</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>"
    return Section("Failed trials", f"{len(failed)} trial{'s' if len(failed) != 1 else ''} produced no objective value. "
                   "The Tune experiment folder has each trial's full log.", body=body)


# The page -------------------------------------------------------------------------------------

# The page's style sheet, shipped beside this module (package data).
CSS = (importlib.resources.files("defect_tune.report") / "page.css").read_text()


def _image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _section_html(section: Section) -> str:
    anchor = re.sub(r"[^a-z0-9]+", "-", section.title.lower()).strip("-")
    parts = [f"<section id='{anchor}'><h2>{html.escape(section.title)}</h2>"]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in section.notes]
    if section.figure is None and section.caption and section.body:
        parts.append(f"<p class='caption'>{html.escape(section.caption)}</p>")
    parts.append(section.body)
    if section.figure is not None:
        parts.append(f"<figure><img alt='{html.escape(section.title)}' src='{_image(section.figure)}'>"
                     f"<figcaption>{html.escape(section.caption)}</figcaption></figure>")
    return "".join(parts) + "</section>"


def _trials(count: int, summary: dict) -> str:
    """The trials run and what bounded them: a number of trials, a time budget (sweep.json's
    num_samples is None when only that did), or both."""
    parts = [str(count)]
    if summary.get("num_samples", "?") is not None:
        parts.append(f"of a budget of {summary.get('num_samples', '?')}")
    if (summary.get("time_budget") or {}).get("seconds"):
        parts.append(f"within a time budget of {_duration(summary['time_budget']['seconds'])}")
    return " ".join(parts)


def _header(sweep: Sweep, notes: list[str]) -> str:
    s = sweep.summary
    reasons = ", ".join(f"{STOPS.get(r, (r,))[0]} {n}" for r, n in (s.get("stop_reasons") or {}).items()) or "none"
    finished = sweep.board[sweep.board[sweep.objective].notna()]
    best = "no trial reported a value"
    if not finished.empty:
        row = finished.iloc[0]
        best = f"trial {row['trial_id']}: {sweep.objective} {_metric(row[sweep.objective])} at epoch {_count(row.get('best_epoch'))} of {_count(row.get('epochs'))}"
    definition = OBJECTIVE_DEFINITION if sweep.objective == OBJECTIVE else "(a metric reported by every trial each epoch)"
    items = [
        ("data", s.get("data", "unknown"), False), ("data fingerprint", s.get("source_fingerprint") or "unknown", False),
        ("objective", f"{sweep.objective} ({'higher' if sweep.mode == 'max' else 'lower'} is better)", False),
        ("definition", definition, True),
        ("search space", s.get("space", "unknown"), False),
        ("trials", f"{_trials(len(sweep.board), s)}, up to {sweep.max_epochs} epochs each", True),
        ("stop reasons", reasons, True), ("wall time", _duration(s.get("seconds")), True), ("best", best, True),
        ("Tune experiment", s.get("experiment", "unknown"), False),
    ]
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd{' class=text' if text else ''}>{html.escape(str(v))}</dd>" for k, v, text in items)
    return (f"<h1>Sweep {html.escape(str(s.get('name', sweep.folder.name)))}</h1><dl class='summary'>{rows}</dl>"
            + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes))


def write_report(results: Path, out: Path | None = None) -> Path:
    """Write RESULTS/report/report.html (or OUT/report.html) and its PNGs; return the HTML's path."""
    sweep = load_sweep(results)
    out = Path(out) if out is not None else Path(results) / "report"
    blocker = out if out.exists() and not out.is_dir() else file_in_the_way(out)
    if blocker is not None:
        raise ReportError(f"{out}: --out is {'a file' if blocker == out else f'under {blocker}, which is a file'}; "
                          "name a folder for report.html and its figures")
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # an earlier report's figure that this one cannot draw must not linger
        (out / name).unlink(missing_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, notes = rebuild_study(sweep)
    try:
        values, reason = importances(study)
    except Exception as error:  # noqa: BLE001 - Optuna's estimator on unusual data must not cost the report
        values, reason = {}, f"No parameter importances: Optuna could not compute them ({type(error).__name__}: {error})."
    ranked = list(values) or sweep.params
    builders = [
        partial(leaderboard_section, sweep), partial(pareto_section, sweep, out), partial(history_section, sweep, out),
        partial(importance_section, study, values, reason, out), partial(parallel_section, sweep, study, ranked, out),
        partial(recall_section, sweep, out), partial(curves_section, sweep, out), partial(savings_section, sweep, out),
        partial(pr_section, sweep, out),
        partial(errors_section, sweep),
    ]
    sections = []
    with matplotlib.rc_context(STYLE):  # also undoes any style a library sets while drawing
        for build in builders:
            try:
                sections.append(build())
            except Exception as error:  # noqa: BLE001 - one figure's failure must not cost the whole report
                title = build.func.__name__.removesuffix("_section").replace("_", " ").capitalize()
                sections.append(Section(title, notes=[f"This section could not be drawn: {type(error).__name__}: {error}"]))
    sections = [s for s in sections if s is not None]
    nav = "<nav>" + "".join(
        f"<a href='#{re.sub(r'[^a-z0-9]+', '-', s.title.lower()).strip('-')}'>{html.escape(s.title)}</a>" for s in sections
    ) + "</nav>"
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>defect-tune report: {html.escape(str(sweep.summary.get('name', '')))}</title><style>{CSS}</style></head>"
        f"<body>{_header(sweep, notes)}{nav}{''.join(_section_html(s) for s in sections)}</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page)
    return path
