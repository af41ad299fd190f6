"""The report's figures, each drawn with matplotlib into a PNG beside the page."""


from __future__ import annotations

import math
import warnings
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

from defect_tune.core.config import PREDICTIONS_FILE, direction
from defect_tune.core.leaderboard import COSTS as COST_NAMES
from defect_tune.core.leaderboard import STOP_REASONS
from defect_tune.report.load import Sweep, metric_text

PARALLEL_PARAMS = 8  # axes of the parallel-coordinate plot; more are unreadable


IMPORTANCE_BARS = 15


DPI = 110


COLOURS = {"completed": "#1f77b4", "early_stopping": "#2ca02c", "asha": "#ff7f0e", "time_budget": "#9467bd",
           "error": "#d62728", "no_result": "#7f7f7f"}


STOPS = {reason: (label, COLOURS[reason]) for reason, label in STOP_REASONS.items()}  # (legend label, colour)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def history_figure(sweep: Sweep, path: Path) -> Path:
    ordered = sweep.in_start_order()
    x = ordered["trial_index"].to_numpy()
    y = pd.to_numeric(ordered[sweep.objective], errors="coerce").to_numpy(dtype=float)
    fig = Figure(figsize=(9, 4.6), layout="constrained")
    ax = fig.add_subplot()
    best = (np.fmax.accumulate(np.where(np.isnan(y), -np.inf, y)) if sweep.mode == "max"
            else np.fmin.accumulate(np.where(np.isnan(y), np.inf, y)))
    best[~np.isfinite(best)] = np.nan
    ax.step(x, best, where="post", color="#333333", lw=1.8, label="best so far", zorder=1)
    finite = y[np.isfinite(y)]
    floor = (finite.min() if len(finite) else 0.0) - 0.05 * (np.ptp(finite) if len(finite) > 1 else 1.0)
    for reason, (label, colour) in STOPS.items():
        mask = (ordered["stop_reason"] == reason).to_numpy()
        if not mask.any():
            continue
        if reason in ("error", "no_result"):
            ax.scatter(x[mask], np.full(mask.sum(), floor), marker="x", s=60, color=colour, label=f"{label} (no value)",
                       zorder=3)
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
    labels = [f"#{r} {t}  ({metric_text(v)})" for r, t, v in zip(top["rank"], top["trial_id"], top[sweep.objective])]
    fig = Figure(figsize=(max(6.5, 0.95 * len(sweep.classes) + 3.5), max(3.4, 0.48 * len(top) + 1.9)),
                 layout="constrained")
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
    handles = [Line2D([], [], color=STOPS[r][1], lw=8, label=STOPS[r][0])
               for r in STOPS if (ordered["stop_reason"] == r).any()]
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
            ax.text(0.5, 0.5, "no validation positives:\nno curve", ha="center", va="center", transform=ax.transAxes,
                    color="#555555")
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
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2 if columns == 1 else 4),
               frameon=False)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def pareto_front(board: pd.DataFrame, objective: str, mode: str, cost: str) -> pd.Series:
    """Per trial: is it on the front of `objective` against `cost` (lower is better)? A trial is,
    when no other trial is at least as good on both and better on one."""
    value = direction(mode) * pd.to_numeric(board[objective], errors="coerce")
    spent = pd.to_numeric(board[cost], errors="coerce")
    known = value.notna() & spent.notna()
    on = pd.Series(False, index=board.index)
    for index in board.index[known]:
        others = known & (board.index != index)
        dominated = (others & (value >= value[index]) & (spent <= spent[index])
                     & ((value > value[index]) | (spent < spent[index])))
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
        low = (pd.to_numeric(rows.get(f"{sweep.objective}_low"), errors="coerce") if f"{sweep.objective}_low" in rows
               else None)
        high = (pd.to_numeric(rows.get(f"{sweep.objective}_high"), errors="coerce") if f"{sweep.objective}_high" in rows
                else None)
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


def curves_figure(curves: dict, states: dict, cutoffs: dict, sweep: Sweep, path: Path) -> Path:
    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for number, curve in curves.items():
        pruned = states.get(number) == "PRUNED"
        ax.plot(list(curve), list(curve.values()), color=STOPS["asha" if pruned else "completed"][1], alpha=0.75,
                lw=1.2, ls="--" if pruned else "-", marker="o", ms=3)
    for rung, cutoff in cutoffs.items():
        ax.axvline(rung, color="#bbbbbb", lw=0.8, zorder=0)
        ax.plot([rung], [cutoff], marker="_", ms=22, mew=2.5, color="#333333", zorder=5)
    handles = [Line2D([], [], color=STOPS["completed"][1], label="ran on"),
               Line2D([], [], color=STOPS["asha"][1], ls="--", label="stopped by ASHA"),
               Line2D([], [], color="#333333", marker="_", ms=14, mew=2.5, ls="none", label="cut-off at the rung")]
    ax.legend(handles=handles, frameon=False, loc="lower right")
    ax.set_xlabel("epoch (Tune's iteration)")
    ax.set_ylabel(f"{sweep.objective} (ties broken by AP)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Each trial's objective per epoch, with ASHA's rungs")
    return _save(fig, path)


def _predictions_path(sweep: Sweep, file: str) -> tuple[Path | None, str | None]:
    """A local path to a predictions file (`<checkpoint>/val_predictions.npz`), or why there is none."""
    text = str(file)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        return None, (f"No precision-recall curves: the best trial's predictions are on remote storage ({text}), and "
                      "the report reads local files only. Copy them next to the results and point the leaderboard's "
                      f"checkpoint column (the folder that holds {PREDICTIONS_FILE}) or, after --cv, its "
                      "fold_predictions column (the files) at the copy, or run the report where the storage is "
                      "mounted.")
    path = Path(text)
    if path.is_file():
        return path, None
    experiment = str(sweep.summary.get("experiment", ""))
    where = (f" (the sweep's storage is {experiment}; run the report where that is reachable)" if "://" in experiment
             else "")
    return None, f"No precision-recall curves: {path} not found{where}."


def _precision_floor(sweep: Sweep) -> float | None:
    """The best trial's precision floor, from the config `search` wrote for it."""
    path = sweep.folder / "best_config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    floor = config.get("precision_floor") if isinstance(config, dict) else None
    return float(floor) if isinstance(floor, int | float) else None
