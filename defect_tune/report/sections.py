"""The report's sections: each a heading, its figure and a table or a few lines of HTML."""


from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from defect_tune.core.leaderboard import COSTS as COST_NAMES
from defect_tune.core.leaderboard import from_results, prediction_files, python_value
from defect_tune.report.figures import (
    DEFAULT_PARETO,
    IMPORTANCE_BARS,
    PARALLEL_PARAMS,
    PARETO_COSTS,
    STOPS,
    _precision_floor,
    _predictions_path,
    curves_figure,
    history_figure,
    importance_figure,
    parallel_figure,
    pareto_figure,
    pareto_front,
    pr_figure,
    recall_figure,
    savings_figure,
)
from defect_tune.report.load import (
    FEW_TRIALS,
    TOP_CONFIGS,
    Section,
    Sweep,
    count_text,
    is_missing,
    metric_text,
    param_text,
)
from defect_tune.report.study import asha_cutoffs, complete_trials, savings, study_curves, tied_with_leader
from defect_tune.search.space import SpaceError, load_space

# How the leaderboard shows each cost the sweep measured (core.leaderboard.COSTS): label, format.
_COST_FORMATS = {"cost/params": lambda v: f"{v / 1e6:.2f}", "cost/gflops_per_image": lambda v: f"{v:.3g}",
                 "cost/peak_memory_mb": lambda v: f"{v:.0f}"}


COSTS = {column: (label, lambda v, shown=_COST_FORMATS.get(column, lambda v: f"{v:.2f}"):
                  "–" if is_missing(v) else shown(v))
         for column, (_, label) in COST_NAMES.items()}


def leaderboard_section(sweep: Sweep) -> Section:
    text = {"trial_id": metric_text, "starting_point": metric_text, "stop_reason": lambda v: STOPS.get(v, (v,))[0]}
    numbers = {"rank": count_text, "epochs": count_text, sweep.objective: metric_text,
               "val_macro_precision": metric_text,
               **{column: shown for column, (_, shown) in COSTS.items() if column in sweep.board}}
    labels = {"rank": "#", "trial_id": "trial", "starting_point": "starting point", "stop_reason": "stopped by",
              "epochs": "epochs", sweep.objective: "objective", "interval": "95% interval", "tied": "vs leader",
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
                low, high = (python_value(row.get(f"{sweep.objective}_low")),
                             python_value(row.get(f"{sweep.objective}_high")))
                shown = "–" if low is None or high is None else f"{low:.3f}–{high:.3f}"
            elif column == "tied":
                shown = "tied" if tied[index] else ""
            else:
                shown = (numbers.get(column) or text[column])(row.get(column))
            cells.append(f"<td{' class=num' if column in numbers or column == 'interval' else ''}>"
                         f"{html.escape(str(shown))}</td>")
        for name in sweep.params:
            value = row.get(f"param/{name}")
            title = " title='not sampled on this branch'" if python_value(value) is None else ""
            cells.append(f"<td{title}>{html.escape(param_text(value))}</td>")
        best = (" class='best'" if python_value(row.get("rank")) == 1 and python_value(row[sweep.objective]) is not None
                else "")
        rows.append(f"<tr{best}>{''.join(cells)}</tr>")
    body = f"<div class='scroll tall'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    caption = (f"Every trial, best {sweep.objective} first (the value at each trial's best epoch), with its 95 % "
               "bootstrap interval over the validation images. An ASHA-stopped trial's "
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


def pareto_section(sweep: Sweep, out: Path) -> Section | None:
    # The sweep's own trade-offs (a multi-objective sweep) first, then latency and size.
    wanted = dict.fromkeys([*(sweep.summary.get("trade_offs") or []), *DEFAULT_PARETO])
    costs = [c for c in wanted if c in PARETO_COSTS and c in sweep.board
             and pd.to_numeric(sweep.board[c], errors="coerce").notna().any()]
    if not costs:
        return None  # a sweep from before costs were measured
    section = Section("Objective against cost")
    section.caption = ("Each point is a trial at its best epoch, with its 95 % interval; red points are the Pareto "
                       f"front: no other trial has a higher {sweep.objective} at a lower cost. Latency is the median "
                       "of repeated forward passes on the device the trial trained on (see the leaderboard for batch "
                       "32 and memory). Pick from the front the cheapest trial whose interval overlaps the leader's, "
                       "or use `defect-tune export --max-latency-ms` / `--max-params`.")
    section.figure = pareto_figure(sweep, costs, out / "pareto.png")
    fronts = {cost: sweep.board.loc[pareto_front(sweep.board, sweep.objective, sweep.mode, cost), "trial_id"].tolist()
              for cost in costs}
    section.notes.append("; ".join(f"on the front against {PARETO_COSTS[c]}: {', '.join(map(str, ids))}"
                                   for c, ids in fronts.items()))
    return section


def history_section(sweep: Sweep, out: Path) -> Section:
    section = Section("Optimization history", notes=[sweep.order_note] if sweep.order_note else [])
    section.caption = ("Each point is one trial's objective, in the order trials started; the line is the best so far. "
                       "Filled points ran every epoch (or stopped by their own early stopping); hollow points were "
                       "stopped by ASHA, so their value comes from fewer epochs; crosses are trials that failed or "
                       "reported nothing. A line that keeps rising late means more trials would likely still help.")
    if sweep.board[sweep.objective].notna().any():
        section.figure = history_figure(sweep, out / "history.png")
    else:
        section.notes.append("No trial reported an objective value, so there is no history to draw.")
    return section


def importance_section(study: optuna.Study, values: dict, reason: str | None, out: Path) -> Section:
    n = len(complete_trials(study))
    section = Section("Parameter importances", notes=[reason] if reason else [])
    section.caption = (f"Optuna's default importance (PED-ANOVA, optuna.importance.get_param_importances) over the {n} "
                       "trials that ran their full budget: how differently each parameter is distributed among the "
                       "best of them than among all of them, as a share of the total. It says which parameters "
                       "mattered in this sweep, not in which direction (see the parallel coordinates for that). With "
                       "few trials, read it as a hint: a couple of trials more can reorder it.")
    if values:
        section.figure = importance_figure(values, n, out / "importances.png")
        if n < FEW_TRIALS:
            section.notes.append(f"Only {n} trials ran their full budget: PED-ANOVA compares the best tenth of them "
                                 "with the rest, so with this few the shares below are closer to noise than to a "
                                 "finding.")
    if len(values) > IMPORTANCE_BARS:
        rest = list(values)[IMPORTANCE_BARS:]
        section.notes.append(f"The figure shows the {IMPORTANCE_BARS} most important parameters; the other {len(rest)} "
                             f"({', '.join(rest)}) share {sum(values[r] for r in rest):.2f} of the total.")
    return section


def parallel_section(sweep: Sweep, study: optuna.Study, ranked: list[str], out: Path) -> Section:
    section = Section("Parameters vs objective")
    section.caption = ("Optuna's parallel-coordinate plot: one line per trial that ran its full budget, from its "
                       "objective (left axis) through its parameter values; darker lines scored higher. Bands where "
                       "the dark lines gather are the values worth keeping. 'None' on an axis marks trials whose "
                       "branch of the space did not sample that parameter. ASHA-stopped trials are left out, their "
                       "objective comes from fewer epochs.")
    complete = complete_trials(study)
    if len(complete) < 2:
        section.notes.append(f"No parallel coordinates: {len(complete)} trial{'s' if len(complete) != 1 else ''} ran "
                             "its full budget, and a single line (or none) shows nothing about the parameters.")
        return section
    present = [p for p in ranked if any(p in t.params for t in complete)]
    if not present:
        section.notes.append("The trials that ran their full budget sampled no parameters.")
        return section
    if len(present) > PARALLEL_PARAMS:
        section.notes.append(f"Only the {PARALLEL_PARAMS} most important of {len(present)} parameters are drawn; the "
                             "leaderboard has them all.")
    section.figure = parallel_figure(study, present[:PARALLEL_PARAMS], sweep.objective,
                                     out / "parallel_coordinates.png")
    return section


def recall_section(sweep: Sweep, out: Path) -> Section:
    section = Section("Per-class recall of the top configurations")
    section.caption = ("Validation recall per class (columns) of the best trials (rows, best first), at the thresholds "
                       "each trial learned (precision at least the floor). A macro average hides a class the model "
                       "misses: look for dark columns. Grey 'n/a' cells are classes without validation positives.")
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


def savings_section(sweep: Sweep, out: Path) -> Section:
    numbers = savings(sweep)
    asha = numbers["by_reason"].get("asha", {"trials": 0, "saved": 0})
    section = Section("ASHA's savings")
    section.caption = ("Each bar is the epochs one trial ran; the hatched part up to the dashed line is what running "
                       "it for the full budget would have added. ASHA stops the trials that trail at each rung, so the "
                       "budget goes to the promising ones.")
    if not numbers["full"]:
        section.notes.append("The sweep has no trials or no epoch budget, so there are no savings to count.")
        return section
    rows = "".join(
        f"<tr><td>{html.escape(STOPS.get(r, (r,))[0])}</td><td class='num'>{v['trials']}</td>"
        f"<td class='num'>{v['run']}</td>"
        f"<td class='num'>{v['saved']}</td></tr>"
        for r, v in sorted(numbers["by_reason"].items(),
                           key=lambda item: list(STOPS).index(item[0]) if item[0] in STOPS else 99)
    )
    section.body = (
        f"<p class='numbers'>The sweep ran <b>{numbers['run']}</b> of the <b>{numbers['full']}</b> epochs that "
        f"{len(sweep.board)} trials × {sweep.max_epochs} epochs would take: <b>{numbers['share']:.1%} saved</b>. "
        f"ASHA stopped {asha['trials']} trial{'s' if asha['trials'] != 1 else ''} early, saving {asha['saved']} epochs "
        f"({asha['saved'] / numbers['full']:.1%} of the full budget).</p>"
        "<table class='small'><thead><tr><th>stopped by</th><th>trials</th><th>epochs run</th>"
        "<th>epochs not run</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    section.figure = savings_figure(sweep, out / "asha_savings.png", numbers["share"])
    return section


def curves_section(sweep: Sweep, out: Path) -> Section | None:
    found = study_curves(sweep)
    if found is None:
        return None
    curves, states = found
    section = Section("Learning curves")
    section.caption = ("One line per trial, its objective at every epoch, from the study the sweep kept (optuna.db). "
                       "The grey lines are ASHA's rungs; the black mark on each is the value a trial needed there to "
                       "go on (the top 1/reduction-factor of the values recorded at that rung). Dashed trials were "
                       "stopped by ASHA.")
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
        section.notes.append("ASHA's cut-offs: " + (", ".join(f"epoch {r}: {v:.4f}" for r, v in cutoffs.items())
                                                    or "no rung below the epoch budget") + ".")
    else:
        section.notes.append("The search space is not at hand, so ASHA's rungs are not drawn.")
    section.figure = curves_figure(curves, states, cutoffs, sweep, out / "learning_curves.png")
    return section


def pr_section(sweep: Sweep, out: Path) -> Section:
    section = Section("Precision-recall curves of the best trial")
    section.caption = ("One panel per class, from the best trial's validation predictions at its best epoch. The red "
                       "dot is where the threshold that defect-tune export hands to production sits on the curve; the "
                       "dashed line is the precision floor the objective guards (recall only counts above it); the "
                       "dotted line is what a random ranking would reach. A curve that stays high further right is a "
                       "better classifier for that class.")
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
        section.notes.append(f"No precision-recall curves: {path} holds probs {probs.shape} and targets "
                             f"{targets.shape} for {len(classes)} classes, which do not match.")
        return section
    thresholds = [python_value(best.get(f"threshold/{c}")) for c in classes]
    empty = [c for k, c in enumerate(classes) if targets[:, k].sum() == 0]
    if empty:
        section.notes.append(f"No curve for {', '.join(empty)}: no positives among the {len(targets)} validation "
                             "images.")
    if all(t is None for t in thresholds):
        section.notes.append("The leaderboard has no exported thresholds (threshold/<class> columns), so no operating "
                             "points are marked.")
    held_out = f"held-out images of {len(files)} folds" if len(files) > 1 else "validation images"
    title = (f"Trial {best['trial_id']} (rank {count_text(best.get('rank'))}), "
             f"epoch {count_text(best.get('best_epoch'))}: {len(targets)} {held_out}")
    section.figure = pr_figure(probs, targets, classes, thresholds, _precision_floor(sweep), title,
                               out / "precision_recall.png")
    return section


def errors_section(sweep: Sweep) -> Section | None:
    failed = sweep.board[sweep.board["stop_reason"].isin(["error", "no_result"])]
    if failed.empty:
        return None
    rows = "".join(
        f"<tr><td>{html.escape(str(row['trial_id']))}</td>"
        f"<td>{html.escape(STOPS.get(row['stop_reason'], (row['stop_reason'],))[0])}</td>"
        "<td class='error'>"
        f"{html.escape(str(python_value(row.get('error')) or 'no epoch finished and no error was recorded'))}"
        "</td></tr>"
        for _, row in failed.iterrows()
    )
    body = ("<table class='small'><thead><tr><th>trial</th><th>stopped by</th><th>error</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
    return Section("Failed trials",
                   f"{len(failed)} trial{'s' if len(failed) != 1 else ''} produced no objective value. "
                   "The Tune experiment folder has each trial's full log.", body=body)
