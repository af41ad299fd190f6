"""What a sweep starts with and `--resume` keeps (folds, overrides, time budget), the budget's cut-
offs, and the repair of a state file a killed driver cut short."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from ray import tune

from defect_tune.core.units import clock
from defect_tune.ray_compat import ray_temp_dir, staged_experiment_states
from defect_tune.search.options import SearchError, SearchOptions
from defect_tune.search.space import SearchSpace


def resolve_cv(requested: int | str, meta: dict) -> tuple[int, str | None]:
    """Folds per trial for `--cv` (0: prepare's split) and what to tell the user about it.

    "auto" cross-validates with 5 folds when some class has fewer than `folds.FEW_POSITIVES`
    validation positives; without --cv such data gets a warning that recommends it.
    """
    from defect_tune.data.folds import FEW_POSITIVES, rare_classes

    rare = rare_classes(meta)
    listed = ", ".join(f"{c} {n}" for c, n in sorted(rare.items(), key=lambda item: item[1]))
    if requested == "auto":
        folds = 5 if rare else 0
        if rare:
            return folds, (f"--cv auto: 5 folds, since these classes have fewer than {FEW_POSITIVES} validation "
                           f"positives: {listed}")
        return 0, f"--cv auto: no cross-validation; every class has {FEW_POSITIVES}+ validation positives"
    folds = int(requested)
    if folds == 1 or folds < 0:
        raise SearchError(f"--cv must be 0 (no cross-validation), 2 or more folds, or auto; got {requested}")
    if folds == 0 and rare:
        return 0, (f"warning: few validation positives ({listed}): one image moves such a class's recall by 1/n, so "
                   "the search may chase noise; --cv 5 trains every trial on 5 folds of train+val (5x the compute)")
    return folds, None


CV_RECORD = "cv.json"  # in the results folder: the folds a sweep started with, for --resume


def folds_for_sweep(options: SearchOptions, space: SearchSpace, meta: dict, out: Path) -> tuple[int, int, str | None]:
    """Folds per trial, their seed, and what to tell the user. A new sweep records them; a resumed
    one uses what it started with, since its trials' Train runs are per fold: resuming a 5-fold
    sweep on prepare's split (or with other folds) would mix two kinds of trial in one leaderboard."""
    record = out / CV_RECORD
    if options.resume:
        started = json.loads(record.read_text()) if record.is_file() else {"folds": 0, "seed": options.seed}
        if options.cv is not None and resolve_cv(options.cv, meta)[0] != started["folds"]:
            raise SearchError(f"--resume: sweep {options.name!r} started with --cv {started['folds']} ({record}); "
                              f"it cannot continue with --cv {options.cv}")
        return started["folds"], started["seed"], None
    cv, advice = resolve_cv(space.cv if options.cv is None else options.cv, meta)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"folds": cv, "seed": options.seed}) + "\n")
    return cv, options.seed, advice


OVERRIDES_RECORD = "overrides.json"  # in the results folder: the key=value overrides a sweep started with


def overrides_for_sweep(options: SearchOptions, out: Path) -> dict:
    """The sweep's key=value overrides. A resumed sweep keeps those it started with (its trials
    must train what the first ones did: `record_overrides`), and refuses different ones."""
    record = out / OVERRIDES_RECORD
    if options.resume:
        started = json.loads(record.read_text()) if record.is_file() else {}
        if options.overrides and options.overrides != started:
            raise SearchError(f"--resume: sweep {options.name!r} started with overrides {started or 'none'} "
                              f"({record}); a resumed sweep keeps them, so drop the key=value arguments")
        return started
    return options.overrides


def record_overrides(options: SearchOptions, out: Path) -> None:
    if options.overrides and not options.resume:
        out.mkdir(parents=True, exist_ok=True)
        (out / OVERRIDES_RECORD).write_text(json.dumps(options.overrides) + "\n")


# in the results folder: a sweep's time budget, trial count and the trials it cut off
BUDGET_RECORD = "time_budget.json"


UNTIL_BUDGET = -1  # Tune's num_samples for "new trials until the time budget runs out"


# Below this, a budget goes mostly to starting Ray and each trial's TorchTrainer, workers and
# data (the leaderboard's startup_seconds), before any epoch: a note says so.
SHORT_BUDGET_S = 60.0


def check_time_budget(options: SearchOptions) -> None:
    """Refuse a time budget that is not a positive, finite number of seconds, before Ray starts."""
    value = options.time_budget_s
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SearchError(f"--time-budget takes a positive number of seconds, got {value!r}")


def budget_for_sweep(options: SearchOptions, space: SearchSpace,
                     out: Path) -> tuple[SearchSpace, float | None, str | None]:
    """The space with the sweep's trial count, its time budget, and what to tell the user.

    A new sweep with a budget and no --num-samples starts trials until the budget runs out, and
    records both in BUDGET_RECORD. A resumed one keeps them, as Tuner.restore does: it restores
    the TuneConfig the sweep started with, whatever --time-budget says now, and starts the
    budget's clock again; a sweep that had used up its budget starts no new trials (Tune recorded
    its searcher as finished)."""
    record = out / BUDGET_RECORD
    if options.resume:
        started = json.loads(record.read_text()) if record.is_file() else {"seconds": None}
        if options.time_budget_s is not None and options.time_budget_s != started["seconds"]:
            was = f"a time budget of {clock(started['seconds'])}" if started["seconds"] else "no time budget"
            raise SearchError(f"--resume: sweep {options.name!r} started with {was}; Tune keeps it, so drop "
                              "--time-budget")
        if not started["seconds"]:
            return space, None, None
        note = (f"--resume: the sweep's time budget of {clock(started['seconds'])} starts again now; "
                "a sweep that used it up starts no new trials")
        return dataclasses.replace(space, num_samples=started["num_samples"]), started["seconds"], note
    if options.time_budget_s is None:
        return space, None, None
    samples = space.num_samples if options.num_samples is not None else UNTIL_BUDGET
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"seconds": options.time_budget_s, "num_samples": samples, "cut_off": []}) + "\n")
    note = None
    if options.time_budget_s < SHORT_BUDGET_S:
        note = (f"note: a time budget of {clock(options.time_budget_s)} is short: every trial starts a TorchTrainer, "
                "its workers and its data before its first epoch (the leaderboard's startup_seconds says how long), so "
                f"few trials may reach ASHA's first rung at epoch {space.grace_period}")
    return dataclasses.replace(space, num_samples=samples), options.time_budget_s, note


class BudgetCutoffs(tune.Callback):
    """Adds the trials that the time budget cut off to the sweep's BUDGET_RECORD.

    When the budget runs out, Tune ends every trial still running (or waiting to start) as
    TERMINATED without calling on_trial_complete, which it calls for the trials that finished or
    that ASHA stopped. So a trial that ends TERMINATED and was never completed was cut off.
    """

    def __init__(self, record: Path):
        self.record = record
        self.completed: set[str] = set()
        self.ended_before: set[str] | None = None

    def setup(self, **info):
        self.completed, self.ended_before = set(), None

    def on_step_begin(self, iteration, trials, **info):
        if self.ended_before is None:  # the trials a resumed sweep had finished before
            self.ended_before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed.add(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        if self.ended_before is None:  # no step ran: nothing was left to cut off
            return
        known = self.completed | self.ended_before
        cut = {t.trial_id for t in trials if t.status == "TERMINATED" and t.trial_id not in known}
        if cut:
            record = json.loads(self.record.read_text())
            record["cut_off"] = sorted(set(record["cut_off"]) | cut)
            self.record.write_text(json.dumps(record) + "\n")


def cut_off_trials(out: Path) -> frozenset[str]:
    record = out / BUDGET_RECORD
    return frozenset(json.loads(record.read_text())["cut_off"]) if record.is_file() else frozenset()


def budget_end_note(board, space: SearchSpace) -> str | None:
    """A note when the time budget ran out before any trial reached ASHA's first rung."""
    if not len(board) or "time_budget" not in set(board["stop_reason"]) or board["epochs"].max() >= space.grace_period:
        return None
    return (f"note: the time budget ran out before any trial reached ASHA's first rung (epoch {space.grace_period}), "
            "so no trial was compared with another; a longer --time-budget gives ASHA something to compare")


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def finish_interrupted_sync(experiment: str, name: str) -> str | None:
    """Before `--resume`: Tune's newest experiment state in a local or mounted storage folder must
    be whole. Tune saves it in the driver's staging folder (under Ray's temp dir) and then copies
    that folder to the storage path; a driver killed during the copy leaves the state file cut
    short (seen in the resume test: 0 bytes), and Tune would resume from nothing, dropping every
    finished trial. The staging folder on this machine still holds the whole copy: it is copied
    over again, and what was done is returned. Where it is gone, this refuses, naming the file.
    Object stores (s3://, gs://) write whole objects, so a URI is left to Tune."""
    if "://" in experiment:
        return None
    states = sorted(Path(experiment).glob("experiment_state-*.json"))
    if not states or _whole_json(states[-1]):
        return None
    state = states[-1]
    temp = ray_temp_dir()
    staged = sorted((p for p in staged_experiment_states(name, state.name) if _whole_json(p)),
                    key=lambda p: p.stat().st_mtime)
    if not staged:
        raise SearchError(
            f"{state}: empty or not valid JSON: the sweep's driver was killed while Tune was copying its state there, "
            f"and the driver's own copy is not under {temp} on this machine. The finished trials' results are in "
            f"{experiment}/run_trial_*/ (progress.csv), but Tune cannot resume from this state; run --resume on the "
            "machine the driver ran on, or start a new sweep"
        )
    shutil.copytree(staged[-1].parent, experiment, dirs_exist_ok=True)
    return (f"{state} had been cut short (the driver was killed while Tune copied it); "
            f"copied the sweep's state again from the driver's staging folder {staged[-1].parent}")
