"""The sweep's Optuna study rebuilt from its results folder, and what the report derives from it:
parameter importances, ASHA's savings and cut-offs, the trials' curves."""


from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from defect_tune.core.leaderboard import python_value
from defect_tune.ray_compat import optuna_contains
from defect_tune.report.load import Sweep
from defect_tune.search.space import SpaceError, load_space


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
        return {p: python_value(row.get(f"param/{p}")) for p in sweep.params
                if python_value(row.get(f"param/{p}")) is not None}
    sampled: dict = {}
    for p in space.params:
        if not p.active(sampled):
            continue
        value = python_value(row.get(f"param/{p.name}"))
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
            notes.append("sweep.json names no search space, so parameter distributions are inferred from the values "
                         "tried.")
    except SpaceError as error:
        space = None
        notes.append(f"The search space could not be read ({error}), so parameter distributions are inferred from the "
                     "values tried.")
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
                notes.append(f"Values of {name} lie outside its distribution in {space_path} (was the file edited "
                             "after the sweep?); its range is inferred from the values tried.")
            distribution = _inferred([v for v in values if v is not None] or [0.0])
        distributions[name] = distribution
    study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize",
                                study_name=sweep.summary.get("name"))
    for row, sampled in rows:
        value, reason = python_value(row[sweep.objective]), row["stop_reason"]
        if value is None or reason in ("error", "no_result"):
            state, kwargs = optuna.trial.TrialState.FAIL, {}
        elif reason in ("asha", "time_budget"):
            epoch = python_value(row.get("best_epoch")) or python_value(row.get("epochs")) or 1
            state, kwargs = optuna.trial.TrialState.PRUNED, {"intermediate_values": {int(epoch): float(value)}}
        else:
            state, kwargs = optuna.trial.TrialState.COMPLETE, {"value": float(value)}
        study.add_trial(optuna.trial.create_trial(
            state=state, params=sampled, distributions={k: distributions[k] for k in sampled},
            user_attrs={"trial_id": str(row["trial_id"])}, **kwargs,
        ))
    return study, notes


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (PED-ANOVA) over the complete trials, or why there are none."""
    complete = complete_trials(study)
    others = len(study.trials) - len(complete)
    if len(complete) < 2:
        return {}, ("No parameter importances: they compare trials that ran their full budget, and this sweep has "
                    f"{len(complete)} such trial{'s' if len(complete) != 1 else ''} ({others} "
                    f"other{'s were' if others != 1 else ' was'} stopped by ASHA, failed or reported nothing). Run "
                    "more trials.")
    if len({t.value for t in complete}) == 1:
        return {}, f"No parameter importances: all {len(complete)} trials that ran their full budget scored the same."
    varying = {name for name in {n for t in complete for n in t.params}
               if len({repr(t.params.get(name, "<unsampled>")) for t in complete}) > 1}
    if not varying:
        return {}, (f"No parameter importances: the {len(complete)} trials that ran their full budget all used the "
                    "same parameters.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA warns about small studies; the caption says so
        raw = optuna.importance.get_param_importances(study, params=sorted(varying), normalize=False)
    total = sum(raw.values())
    if total <= 0:  # Optuna would normalise this to equal shares, which reads as a finding
        return {}, (f"No parameter importances: PED-ANOVA tells no parameter apart among the {len(complete)} trials "
                    "that ran their full budget (too few trials, or too few per branch of the space).")
    return {name: value / total for name, value in raw.items()}, None


def tied_with_leader(board: pd.DataFrame, objective: str) -> pd.Series:
    """Per trial: is its objective inside the leader's 95 % interval (`<objective>_low` ..
    `_high`, bootstrap over validation images)? Then this split does not tell it from the leader.
    False for the leader itself and wherever the interval or the objective is missing."""
    low, high = f"{objective}_low", f"{objective}_high"
    values = pd.to_numeric(board.get(objective), errors="coerce") if objective in board else None
    if values is None or low not in board or not len(board) or pd.isna(values.iloc[0]):
        return pd.Series(False, index=board.index)
    lead_low, lead_high = python_value(board[low].iloc[0]), python_value(board[high].iloc[0])
    if lead_low is None or lead_high is None:
        return pd.Series(False, index=board.index)
    tied = values.between(lead_low, lead_high)
    tied.iloc[0] = False
    return tied.fillna(False)


def savings(sweep: Sweep) -> dict:
    """Epochs run against what running every trial for max_epochs would cost, per stop reason."""
    epochs = pd.to_numeric(sweep.board["epochs"], errors="coerce").fillna(0)
    full = len(sweep.board) * sweep.max_epochs
    by_reason = {}
    for reason, group in epochs.groupby(sweep.board["stop_reason"]):
        by_reason[reason] = {"trials": len(group), "run": int(group.sum()),
                             "saved": int(len(group) * sweep.max_epochs - group.sum())}
    run = int(epochs.sum())
    return {"run": run, "full": full, "saved": full - run, "share": (full - run) / full if full else 0.0,
            "by_reason": by_reason}


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


def asha_cutoffs(curves: dict[int, dict[int, float]], grace: int, factor: float, max_epochs: int,
                 mode: str) -> dict[int, float]:
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
