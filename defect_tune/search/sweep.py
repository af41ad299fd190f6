"""`defect-tune search`: Ray Tune drives Optuna (TPE) and ASHA over trials that each fit a
TorchTrainer. The same command searches on a laptop (a local Ray cluster) and on a GPU cluster
(`--address`, shared `--storage`)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console
from rich.table import Table

from defect_tune.core.config import PREDICTIONS_FILE, selection_metric
from defect_tune.core.errors import UserError
from defect_tune.core.leaderboard import build_leaderboard, in_results, paths_in_results, plain, prediction_files, ranked_by
from defect_tune.data.folds import make_folds
from defect_tune.data.shards import check_shards, data_location, read_meta
from defect_tune.production.export import ExportError, package_versions, pick
from defect_tune.search.post import start_report_post
from defect_tune.search.ray_compat import (job_placement_groups, local_cluster_addresses, optuna_trial_of, quiet_start_notices,
                                           ray_temp_dir, remove_job_placement_group, staged_experiment_states,
                                           start_data_stats_actor)
from defect_tune.search.space import DefineByRun, SearchSpace, SpaceError, load_space
from defect_tune.search.tracking import wandb_callbacks
from defect_tune.search.trial import TrialSetup, run_trial

# The checkout's search_spaces/, installed as this package's data (pyproject.toml), so a wheel has it too.
SPACES_DIR = Path(str(importlib.resources.files("defect_tune.search_spaces")))


class SearchError(UserError):
    """A sweep that cannot start; the message says why."""


@dataclass(frozen=True)
class SearchOptions:
    data: Path | str  # a path every node reads, or a URI (s3://, gs://, file://)
    space: Path
    name: str
    out: Path | None = None  # default results/<name>
    num_samples: int | None = None  # default: the space's budget, or until the time budget runs out
    # Seconds after which Tune stops the sweep; trials still running keep the epochs they reported.
    time_budget_s: float | None = None
    workers_per_trial: int = 1
    # A scheduling share: Ray gives a worker with one CPU or less one torch thread either way, and
    # half a CPU lets two trials train side by side on a 2-core laptop with a core left for Data.
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # Workers sharing each GPU (sets gpus_per_worker to 1/N), or "auto": as many as the space's
    # hungriest backbone leaves room for, measured on one of the cluster's GPUs.
    trials_per_gpu: int | str | None = None
    max_concurrent: int | None = None  # default: from the cluster's resources
    address: str | None = None  # None: start a local Ray cluster
    storage: str | None = None  # default: <out>/tune; a URI (s3://, gs://) or shared path for multi-node
    resume: bool = False
    seed: int = 0
    max_failures: int = 0
    wandb_project: str | None = None  # log every trial as a W&B run (offline without a key)
    cv: int | str | None = None  # folds per trial, 0 for none, or "auto"; None: the space's `cv`
    # A worker keeps its train shard in memory (and augments it itself) when the shard's images
    # take at most this much; 0: every epoch streams it from Ray Data, augmented there.
    keep_train_gb: float = 2.0
    # `key=value` from the command line: `epochs` sets the space's max_epochs, any other
    # TrainConfig key a fixed value (SearchSpace.with_overrides). A resumed sweep keeps its own.
    overrides: dict = dataclasses.field(default_factory=dict)


class AshaAwareOptunaSearch(OptunaSearch):
    """Tells Optuna that a trial ASHA stopped was pruned, not completed.

    Tune reports an ASHA-stopped trial as complete with its last, partly trained value, which
    biases TPE toward configurations that look good early. As PRUNED, TPE ranks it by its
    intermediate values instead (the base class marks a trial PRUNED when no value is given).
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_by_scheduler = (
            not error and result is not None and not result.get("early_stopped")
            # A trial whose own (searched) epoch budget ended before max_epochs completed.
            and result.get("epoch", self._max_epochs) < result.get("planned_epochs", self._max_epochs)
        )
        # Tune hands a trial's last result here only: report it as its last epoch's value, so the
        # stored study holds every epoch (Optuna takes no per-epoch values under several objectives).
        trial = optuna_trial_of(self, trial_id) if result and not isinstance(self.metric, list) else None
        if trial is not None and result.get(self.metric) is not None and "training_iteration" in result:
            trial.report(float(result[self.metric]), int(result["training_iteration"]))
        super().on_trial_complete(trial_id, None if stopped_by_scheduler else result, error)


SPACE_FILE = "space.yaml"  # in the results folder: a copy of the sweep's search space
STUDY_FILE = "optuna.db"  # in the results folder: the sweep's Optuna study, for optuna-dashboard


def study_storage(out: Path):
    """The sweep's Optuna study in SQLite in the results folder: every trial's parameters, its
    per-epoch values and its state (ASHA-stopped trials as PRUNED), written by the driver as the
    searcher learns them, so that `optuna-dashboard sqlite:///RESULTS/optuna.db` works during and
    after the sweep. Tune pickles the searcher for --resume; the storage reconnects on unpickling."""
    import optuna

    out.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{(out / STUDY_FILE).absolute()}")


class SweepConsole(tune.Callback):
    """What the driver shows while the sweep runs: one line per event (a trial starts, reports an
    epoch, finishes or is stopped, fails), each finish with where the sweep stands (trials
    finished, running, best so far with its interval, elapsed and remaining time). On a terminal a
    live status line stays below them; in a log the lines alone, never a table reprinted per trial."""

    def __init__(self, space: SearchSpace, console: Console, budget_s: float | None = None):
        self.space, self.console, self.budget_s = space, console, budget_s
        self.rows: dict[str, dict] = {}
        self.started: float | None = None
        self.live = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "console": None, "live": None, "started": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, console=Console(stderr=True))

    def setup(self, **info):
        self.started = time.monotonic()
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.status(), console=self.console, refresh_per_second=2, transient=True)
            self.live.start()

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        if self.live is not None:
            self.live.update(self.status())

    def _row(self, trial) -> dict:
        return self.rows.setdefault(trial.trial_id, {"state": "running", "epoch": 0, "objective": None, "low": None,
                                                     "high": None, "planned": self.space.max_epochs, "early": False})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "running"
        of = f"/{self.space.num_samples}" if self.space.num_samples > 0 else ""
        self._say(f"[start {len(self.rows)}{of}] {trial.trial_id} {_short(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        key = self.space.objective
        value = result.get(key)
        score = result.get(selection_metric(key), value)
        row.update(epoch=result.get("epoch", 0), planned=result.get("planned_epochs", self.space.max_epochs),
                   early=bool(result.get("early_stopped")))
        # A trial counts with its best epoch so far, as the leaderboard ranks it.
        if score is not None and (row.get("score") is None or (score > row["score"] if self.space.mode == "max" else score < row["score"])):
            row.update(objective=value, score=score, low=result.get(f"{key}_low"), high=result.get(f"{key}_high"))
        shown = "-" if value is None else f"{value:.4f}"
        self._say(f"[epoch {row['epoch']}/{row['planned']}] {trial.trial_id} {key}={shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row["epoch"] >= row["planned"]:
            row["state"], how = "completed", f"completed {row['epoch']} epochs"
        elif row["early"]:
            row["state"], how = "early_stopped", f"stopped itself (early stopping) after epoch {row['epoch']}"
        else:
            row["state"], how = "asha", f"stopped by ASHA after epoch {row['epoch']}"
        self._say(f"[done] {trial.trial_id} {how}: {_figure(row)}. {self.standing()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "error"
        self._say(f"[error] {trial.trial_id}: see {trial.local_path}/error.txt. {self.standing()}")

    def best(self) -> tuple[str, dict] | None:
        scored = [(t, r) for t, r in self.rows.items() if r["objective"] is not None and r["state"] != "error"]
        if not scored:
            return None
        pick = max if self.space.mode == "max" else min  # ties on the objective go to validation AP, as in the leaderboard
        return pick(scored, key=lambda item: item[1]["objective"] if item[1].get("score") is None else item[1]["score"])

    def standing(self) -> str:
        states = [row["state"] for row in self.rows.values()]
        finished = sum(s != "running" for s in states)
        of = f"/{self.space.num_samples}" if self.space.num_samples > 0 else ""
        counts = ", ".join(f"{n} {label}" for label, n in (
            ("completed", states.count("completed")), ("stopped by ASHA", states.count("asha")),
            ("early-stopped", states.count("early_stopped")), ("failed", states.count("error"))) if n)
        parts = [f"{finished}{of} finished" + (f" ({counts})" if counts else ""), f"{states.count('running')} running"]
        if (best := self.best()) is not None:
            parts.append(f"best {best[0]} {_figure(best[1])}")
        if self.started is not None:
            elapsed = time.monotonic() - self.started
            parts.append(f"{clock(elapsed)} elapsed")
            if self.budget_s:
                parts.append(f"at most {clock(max(self.budget_s - elapsed, 0))} left (time budget)")
            elif self.space.num_samples > 0 and finished:
                left = self.space.num_samples - finished
                parts.append(f"about {clock(elapsed / finished * left)} left" if left else "all trials finished")
        return "; ".join(parts)

    def status(self):
        from rich.text import Text

        return Text(f"sweep: {self.standing()}", style="bold")


def clock(seconds: float) -> str:
    """`45s`, `3m12s`, `1h05m`: a duration as a person reads a clock."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _figure(row: dict) -> str:
    if row["objective"] is None:
        return "no objective"
    interval = f" ({row['low']:.3f}-{row['high']:.3f})" if row["low"] is not None and row["high"] is not None else ""
    return f"{row['objective']:.4f}{interval}"


def _short(config: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


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
            return folds, f"--cv auto: 5 folds, since these classes have fewer than {FEW_POSITIVES} validation positives: {listed}"
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
            raise SearchError(f"--resume: sweep {options.name!r} started with overrides {started or 'none'} ({record}); "
                              "a resumed sweep keeps them, so drop the key=value arguments")
        return started
    return options.overrides


def record_overrides(options: SearchOptions, out: Path) -> None:
    if options.overrides and not options.resume:
        out.mkdir(parents=True, exist_ok=True)
        (out / OVERRIDES_RECORD).write_text(json.dumps(options.overrides) + "\n")


BUDGET_RECORD = "time_budget.json"  # in the results folder: a sweep's time budget, trial count and the trials it cut off
UNTIL_BUDGET = -1  # Tune's num_samples for "new trials until the time budget runs out"
# Below this, a budget goes mostly to starting Ray and each trial's TorchTrainer, workers and
# data (the leaderboard's startup_seconds), before any epoch: a note says so.
SHORT_BUDGET_S = 60.0


def format_duration(seconds: float) -> str:
    """`2h`, `20m` or `90.5s`: the largest unit that gives a whole number, else seconds."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def check_time_budget(options: SearchOptions) -> None:
    """Refuse a time budget that is not a positive, finite number of seconds, before Ray starts."""
    value = options.time_budget_s
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SearchError(f"--time-budget takes a positive number of seconds, got {value!r}")


def budget_for_sweep(options: SearchOptions, space: SearchSpace, out: Path) -> tuple[SearchSpace, float | None, str | None]:
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
            was = f"a time budget of {format_duration(started['seconds'])}" if started["seconds"] else "no time budget"
            raise SearchError(f"--resume: sweep {options.name!r} started with {was}; Tune keeps it, so drop --time-budget")
        if not started["seconds"]:
            return space, None, None
        note = (f"--resume: the sweep's time budget of {format_duration(started['seconds'])} starts again now; "
                "a sweep that used it up starts no new trials")
        return dataclasses.replace(space, num_samples=started["num_samples"]), started["seconds"], note
    if options.time_budget_s is None:
        return space, None, None
    samples = space.num_samples if options.num_samples is not None else UNTIL_BUDGET
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"seconds": options.time_budget_s, "num_samples": samples, "cut_off": []}) + "\n")
    note = None
    if options.time_budget_s < SHORT_BUDGET_S:
        note = (f"note: a time budget of {format_duration(options.time_budget_s)} is short: every trial starts a TorchTrainer, "
                "its workers and its data before its first epoch (the leaderboard's startup_seconds says how long), so few "
                f"trials may reach ASHA's first rung at epoch {space.grace_period}")
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


def cpus_for_workers(cpus: float) -> float:
    """The CPUs that trials' workers may reserve: all but a quarter, at least one, which is left
    unreserved for Ray Data's tasks (`trials_at_once`)."""
    return cpus - max(1.0, cpus / 4)


def trials_at_once(resources: dict, options: SearchOptions, folds: int = 0) -> int:
    """How many trials run side by side with cores to spare for Ray Data.

    Each trial's workers take `workers * cpus_per_worker` CPUs (and GPUs); the trial function
    itself takes none, and neither do Ray Data's tasks (`ingest.build_datasets`), so no count can
    starve them. They still need cores to run on: a quarter of the CPUs, at least one, is left
    unreserved for them, unless that leaves no room for even one trial.
    """
    if options.max_concurrent:
        return options.max_concurrent
    cpus = resources.get("CPU", 0)
    per_trial = options.workers_per_trial * options.cpus_per_worker * max(folds, 1)  # a trial's folds run side by side
    by_cpu = math.floor(cpus_for_workers(cpus) / per_trial) if per_trial else 1_000_000
    by_gpu = 1_000_000
    if options.gpus_per_worker > 0:
        by_gpu = math.floor(resources.get("GPU", 0) / (options.workers_per_trial * options.gpus_per_worker * max(folds, 1)))
    count = min(by_cpu, by_gpu)
    if count < 1 and folds and cpus >= options.workers_per_trial * options.cpus_per_worker and (
            options.gpus_per_worker == 0 or resources.get("GPU", 0) >= options.workers_per_trial * options.gpus_per_worker):
        count = 1  # the trial's folds take turns; its fold-mean follows the slowest fold
    if count < 1 and by_gpu >= 1 and cpus >= per_trial:
        count = 1  # no spare core: Data shares the workers'
    if count < 1:
        raise SearchError(
            f"the cluster ({resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs) cannot run one trial of "
            f"{options.workers_per_trial} worker(s) x {options.cpus_per_worker} CPU / {options.gpus_per_worker} GPU"
        )
    return count


def folds_side_by_side(resources: dict, options: SearchOptions, folds: int) -> str | None:
    """A note when one trial's folds cannot all train at once on this cluster, with the
    --cpus-per-worker at which they would; None when they can."""
    cpus = resources.get("CPU", 0)
    usable = cpus_for_workers(cpus)
    need = options.workers_per_trial * options.cpus_per_worker * folds
    if need <= max(usable, 0) or usable <= 0:
        return None
    fits = math.floor(usable / (options.workers_per_trial * folds) * 10) / 10
    advice = f"; --cpus-per-worker {fits:g} runs them side by side" if fits > 0 else ""
    return (f"note: a trial's {folds} folds need {need:g} CPUs, more than the {usable:g} left for workers: folds take turns, so "
            f"ASHA sees a trial's first fold-mean only when its last fold has trained an epoch{advice}")


# The share of a GPU's memory that `--trials-per-gpu auto` fills with measured workers; the rest
# is for what the measurement does not see: fragmentation and validation's batches.
GPU_MEMORY_FILL = 0.85


def gpu_share(trials_per_gpu: int) -> float:
    """A worker's GPU fraction when `trials_per_gpu` workers share each GPU, rounded down to
    Ray's resolution (0.0001) so that all of them fit."""
    return math.floor(10_000 / trials_per_gpu) / 10_000


def fit_on_gpu(peaks: dict[str, int], total: int) -> int:
    """How many workers of the hungriest backbone in `peaks` (bytes each) fit on a GPU of
    `total` bytes."""
    model, peak = max(peaks.items(), key=lambda item: item[1])
    count = math.floor(GPU_MEMORY_FILL * total / peak)
    if count < 1:
        raise SearchError(
            f"--trials-per-gpu auto: {model} takes {peak / 2**30:.1f} GiB at the space's largest settings, more than "
            f"{GPU_MEMORY_FILL:.0%} of the GPU's {total / 2**30:.1f} GiB; lower the space's batch_size"
        )
    return count


def _gpu_memory(configs: list, meta: dict) -> dict:
    """Runs on a GPU node (`measure_gpu_memory`)."""
    import torch

    from defect_tune.training.train import training_memory

    if not torch.cuda.is_available():
        raise RuntimeError(f"node {ray.util.get_node_ip_address()} offers Ray a GPU, but torch sees no CUDA device")
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    peaks = {config.model: training_memory(config, meta, device) for config in configs}
    return {"gpu": properties.name, "total": properties.total_memory, "peaks": peaks,
            "batch_size": configs[0].batch_size}


def measure_gpu_memory(space: SearchSpace, meta: dict, timeout: float = 900.0) -> dict:
    """Each backbone's peak memory at the space's largest settings (`largest_configs`), measured
    on one whole GPU of the cluster before any trial takes one (where an autoscaler adds GPU
    nodes, on the first one it adds: hence the long `timeout`)."""
    task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(_gpu_memory).remote(space.largest_configs(), meta)
    try:
        return ray.get(task, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(task, force=True)
        raise SearchError(f"--trials-per-gpu auto: no whole GPU came free within {timeout:g} s to measure the "
                          "backbones on; pass --trials-per-gpu N") from None
    except ray.exceptions.RayTaskError as error:
        raise SearchError(f"--trials-per-gpu auto: measuring the backbones failed: {error.cause!r}") from None


def gpus_for_workers(options: SearchOptions, space: SearchSpace, meta: dict, resources: dict,
                     console: Console) -> tuple[float, dict | None]:
    """Each worker's GPU share (`--gpus-per-worker`, or from `--trials-per-gpu`), and what
    `--trials-per-gpu auto` measured."""
    if options.trials_per_gpu is None:
        if resources.get("GPU", 0) and not options.gpus_per_worker:
            console.print(f"note: the cluster has {resources['GPU']:g} GPU(s) and trials use none; --trials-per-gpu auto "
                          "trains on them", highlight=False, markup=False, soft_wrap=True)
        return options.gpus_per_worker, None
    if not resources.get("GPU", 0) and not options.max_concurrent:  # --max-concurrent: an autoscaler adds them
        raise SearchError(f"--trials-per-gpu {options.trials_per_gpu}: the cluster has no GPUs (where an autoscaler "
                          "adds GPU nodes as trials wait, pass --max-concurrent)")
    if options.trials_per_gpu != "auto":
        return gpu_share(options.trials_per_gpu), None
    console.print("--trials-per-gpu auto: measuring the space's backbones on one GPU", highlight=False, markup=False)
    measured = measure_gpu_memory(space, meta)
    measured["trials_per_gpu"] = count = fit_on_gpu(measured["peaks"], measured["total"])
    sizes = ", ".join(f"{model} {peak / 2**30:.1f} GiB" for model, peak in measured["peaks"].items())
    console.print(f"--trials-per-gpu auto: {count} per GPU ({measured['gpu']}, {measured['total'] / 2**30:.0f} GiB; "
                  f"at batch {measured['batch_size']}: {sizes})", highlight=False, markup=False, soft_wrap=True)
    return gpu_share(count), measured


def check_gpu_options(options: SearchOptions) -> None:
    """Refuse `--trials-per-gpu` values that cannot work, before Ray starts."""
    value = options.trials_per_gpu
    if value is None:
        return
    if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise SearchError(f"--trials-per-gpu takes a positive number of workers per GPU or auto, got {value!r}")
    if options.gpus_per_worker:
        raise SearchError(f"--trials-per-gpu {value} sets each worker's GPU share; drop --gpus-per-worker "
                          f"{options.gpus_per_worker:g}")


def wait_for_release(total: dict, timeout: float = 30.0) -> tuple[dict, int]:
    """Free resources once the sweep's trials have let go of theirs, and how many placement groups
    this had to remove itself. Train removes a finished run's placement group; one whose trial
    process was killed (cut off by the time budget) waits for Train's detached cleaner, which can
    lag for minutes on a loaded node. No trial of the sweep runs now, so after `timeout` every
    placement group this job still holds is such a leftover: removed here, and waited for again."""
    removed = 0
    for attempt in range(2):
        deadline = time.monotonic() + timeout
        while True:
            free = ray.available_resources()
            if all(free.get(k, 0) >= total[k] - 1e-6 for k in ("CPU", "GPU") if k in total):
                return free, removed
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if attempt == 0:
            leftovers = job_placement_groups(ray.get_runtime_context().get_job_id())
            for placement_group in leftovers:
                remove_job_placement_group(placement_group)
            removed = len(leftovers)
    return free, removed


def refuse_second_local_cluster(address: str | None) -> None:
    """Starting a local Ray cluster beside another one on this machine hangs sweeps: Train's
    placement-group cleaner finds its cluster through the State API without an address, fails
    with "Found multiple active Ray instances", and each stopped trial's CPUs stay reserved until
    Ray Data starves (seen here with two sweeps at once). Use the running one, or stop it."""
    if address is not None or os.environ.get("RAY_ADDRESS"):  # set for drivers of Ray jobs
        return
    running = local_cluster_addresses()
    if running:
        raise SearchError(
            f"a Ray cluster is already running on this machine ({', '.join(running)}); pass --address "
            f"{running[0]} to use it, or stop it with `ray stop`: a second local cluster breaks Train's "
            "placement-group cleaner and hangs the sweep"
        )


# What the Ray processes of a local cluster that `search` or `retrain` starts itself are given,
# unless the user set it.
# - Train starts a preemption watcher actor per run (one more process per trial, with its own Ray
#   start-up) to notice nodes that an autoscaler drains. One machine, started here, has no
#   autoscaler and no node to drain.
# - The raylet kills a worker process idle for 1 s once the node has more workers than CPUs, which
#   a sweep always has (each trial is several actors). So every trial started new processes for
#   its Ray Data tasks and actors, each paying Ray's start-up, while the last trial's idle ones had
#   just been killed. Kept 60 s, they serve the next trial (benchmarks/bench_worker_pool.py).
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_idle_worker_killing_time_threshold_ms": "60000"}


def start_ray(address: str | None, **init) -> None:
    """`ray.init`, after refusing a second local cluster on this machine. A local cluster started
    here gets LOCAL_CLUSTER_ENV: its processes inherit this process's environment at start, which
    is then restored, so nothing else in this process sees it."""
    refuse_second_local_cluster(address)
    local = address is None and not os.environ.get("RAY_ADDRESS")
    added = {key: value for key, value in LOCAL_CLUSTER_ENV.items() if local and key not in os.environ}
    os.environ.update(added)
    try:
        ray.init(address=address, **init)
    finally:
        for key in added:
            os.environ.pop(key, None)


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
    staged = sorted((p for p in staged_experiment_states(name, state.name) if _whole_json(p)), key=lambda p: p.stat().st_mtime)
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


def _storage(options: SearchOptions, out: Path) -> str:
    if options.storage is None:
        return str((out / "tune").absolute())
    if "://" in options.storage:
        return options.storage
    return str(Path(options.storage).absolute())


def run_search(options: SearchOptions, console: Console | None = None) -> dict:
    """Run (or resume) a sweep; write the leaderboard and best config; return a summary."""
    console = console or Console(stderr=True)
    check_gpu_options(options)
    check_time_budget(options)
    out = (options.out or Path("results") / options.name).absolute()
    space_overrides = overrides_for_sweep(options, out)
    space = load_space(options.space).with_overrides(space_overrides)
    if options.num_samples is not None:
        space = SearchSpace(**{**space.__dict__, "num_samples": options.num_samples})
    meta = read_meta(options.data)
    check_shards(options.data, meta)  # a missing or corrupt shard stops the sweep here, not trial by trial
    storage = _storage(options, out)
    experiment = f"{storage.rstrip('/')}/{options.name}"
    if options.resume and (repaired := finish_interrupted_sync(experiment, options.name)):
        console.print(f"--resume: {repaired}", style="yellow", highlight=False, markup=False)
    if not options.resume and tune.Tuner.can_restore(experiment):
        raise SearchError(f"sweep {options.name!r} already exists at {experiment}; --resume continues it, or pick another --name")
    if options.resume and not tune.Tuner.can_restore(experiment):
        raise SearchError(f"--resume: no sweep {options.name!r} to resume at {experiment}")
    if not options.resume and (out / STUDY_FILE).is_file():
        import optuna

        if options.name in optuna.study.get_all_study_names(study_storage(out)):
            raise SearchError(f"{out / STUDY_FILE} already holds a study named {options.name!r} (a sweep whose Tune "
                              "experiment is gone); --resume cannot continue it: pick another --name or --out")
    record_overrides(options, out)

    # Save (and sync to storage) Tune's experiment state at every step, not every 10+ s ("auto"):
    # trial results reach the storage path only with that sync, so a driver killed right after a
    # trial finished would otherwise lose it. Measured: a 2 s period lost finished trials to a
    # SIGKILL in the resume test; every step costs the 2-core quick sweep about a quarter of its time.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    quiet_start_notices()
    cv, fold_seed, advice = folds_for_sweep(options, space, meta, out)
    if advice:
        console.print(advice, style="yellow" if advice.startswith("warning") else None, highlight=False, markup=False)
    space, budget, budget_note = budget_for_sweep(options, space, out)
    if budget_note:
        console.print(budget_note, highlight=False, markup=False, soft_wrap=True)
    folds = make_folds(options.data, meta, cv, fold_seed) if cv else []
    started = time.perf_counter()
    start_ray(options.address, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    try:
        start_data_stats_actor()
        reports = start_report_post()  # trials hand their reports on through it; it lives while this handle does
        resources = ray.cluster_resources()
        gpus_per_worker, gpu_memory = gpus_for_workers(options, space, meta, resources, console)
        options = dataclasses.replace(options, gpus_per_worker=gpus_per_worker)
        concurrent = trials_at_once(resources, options, cv)
        setup = TrialSetup(
            data_dir=data_location(options.data), meta=meta, space=space, storage_path=storage,
            sweep_name=options.name, workers_per_trial=options.workers_per_trial,
            cpus_per_worker=options.cpus_per_worker, gpus_per_worker=options.gpus_per_worker,
            max_failures=options.max_failures, folds=tuple(folds), keep_train_bytes=options.keep_train_gb * 2**30,
        )
        # The trial function only waits on its TorchTrainer: it takes no CPU, so that every core
        # not given to workers is left to Ray Data (Tune refuses an all-zero request, so the
        # bundle asks for a token of memory instead).
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 0, "memory": 2**20})
        progress = SweepConsole(space, console, budget)
        cutoffs = [BudgetCutoffs(out / BUDGET_RECORD)] if budget else []
        if options.resume:
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            # With trade-offs, Optuna's TPE proposes for all of them (multi-objective); ASHA
            # stops trials on the objective alone.
            metric, mode = space.metrics if space.trade_offs else (selection_metric(space.objective), space.mode)
            searcher = AshaAwareOptunaSearch(
                space=DefineByRun(space), metric=metric, mode=mode,
                points_to_evaluate=[dict(p) for _, p in space.points] or None,
                seed=options.seed, study_name=options.name, max_epochs=space.max_epochs, storage=study_storage(out),
            )
            scheduler = ASHAScheduler(
                # Our own epoch count, not Tune's training_iteration: a trial restarted from its
                # Train checkpoint (after a failure or --resume) reports from where it left off,
                # while Tune's counter starts again at 1.
                time_attr="epoch", metric=selection_metric(space.objective), mode=space.mode, max_t=space.max_epochs,
                grace_period=space.grace_period, reduction_factor=space.reduction_factor,
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=scheduler,
                    num_samples=space.num_samples, max_concurrent_trials=concurrent, reuse_actors=False,
                    time_budget_s=budget,
                ),
                run_config=tune.RunConfig(
                    name=options.name, storage_path=storage, verbose=0,
                    callbacks=[progress, *cutoffs, *wandb_callbacks(options.wandb_project, options.name, out, space, meta, console)],
                    failure_config=tune.FailureConfig(max_failures=options.max_failures),
                ),
            )
        if cv:
            fold_note = folds_side_by_side(resources, options, cv)
            if fold_note:
                console.print(fold_note, highlight=False, markup=False)
        per_trial = f", each on {cv} folds of train+val" if cv else ""
        count = f"{space.num_samples} trials" if space.num_samples > 0 else "trials"
        until = f" until its time budget of {format_duration(budget)} runs out" if budget else ""
        console.print(
            f"sweep {options.name}: {count} of {Path(space.path).name}{per_trial}{until}, {concurrent} at a time on "
            f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs; Tune experiment {experiment}",
            highlight=False,
        )
        results = tuner.fit()
        ray.kill(reports)  # every trial has ended
        cut_off = cut_off_trials(out)
        board = build_leaderboard(results, space, meta["classes"], cut_off)
        free, leftovers = wait_for_release(resources)
    finally:
        ray.shutdown()
    if leftovers:
        console.print(f"note: removed {leftovers} placement group(s) that Ray Train had not given back after their trials "
                      "ended (cut off or stopped); their resources are free again", highlight=False, markup=False)
    if budget and (end_note := budget_end_note(board, space)):
        console.print(end_note, style="yellow", highlight=False, markup=False, soft_wrap=True)
    cv_record = {"folds": cv, "seed": fold_seed} if cv else None
    budget_record = {"seconds": budget, "cut_off": sorted(cut_off)} if budget else None
    return write_results(out, board, space, options, experiment, meta, time.perf_counter() - started, free, resources, cv_record,
                         gpu_memory, budget_record, leftovers)


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
    out.mkdir(parents=True, exist_ok=True)
    # Paths inside the results folder are kept relative to it, and the space is copied in: the
    # folder can be moved or copied to another machine, and report and export still find it all.
    board = paths_in_results(board, out)
    board.to_csv(out / "leaderboard.csv", index=False)
    board.to_parquet(out / "leaderboard.parquet", index=False)
    if Path(space.path).absolute() != (out / SPACE_FILE).absolute():
        shutil.copyfile(space.path, out / SPACE_FILE)
    summary = {
        "name": options.name, "space": SPACE_FILE, "space_source": space.path, "data": data_location(options.data),
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
        "worker": {"per_trial": options.workers_per_trial, "cpus": options.cpus_per_worker, "gpus": options.gpus_per_worker},
        "gpu_memory": gpu_memory,  # what --trials-per-gpu auto measured
    }
    # Every trial's full training config, so `export --rank k` never needs the space file again.
    configs = {}
    for _, row in board.iterrows():
        sampled = {k.removeprefix("param/"): plain(v) for k, v in row.items() if k.startswith("param/") and plain(v) is not None}
        configs[row["trial_id"]] = space.config_for(sampled).model_dump()
    (out / "trial_configs.json").write_text(json.dumps(configs, indent=2) + "\n")
    try:  # the trial `export` would pick: the best that finished an epoch without error
        best = pick(board, ranked_by(board, space.objective), space.mode, 1, out) if len(board) else None
    except ExportError:  # no such trial
        best = None
    if best is not None:
        sampled = {k.removeprefix("param/"): plain(v) for k, v in best.items() if k.startswith("param/") and plain(v) is not None}
        config = space.config_for(sampled)
        header = (
            f"# best of sweep {options.name}: trial {best['trial_id']}, {space.objective} = {best[space.objective]:.4f} "
            f"at epoch {best['best_epoch']} of {best['epochs']}\n# data {meta.get('source_fingerprint')}\n"
        )
        (out / "best_config.yaml").write_text(header + config.to_yaml())
        summary["best"] = {"trial_id": best["trial_id"], space.objective: float(best[space.objective]),
                           "best_epoch": int(best["best_epoch"]), "params": sampled}
        summary["best_predictions"] = keep_best_predictions(best, out)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def bundled_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space(space: Path | str | None) -> Path:
    """A space file: the bundled quick space when none is given; a bundled space by name (`el_solar`);
    otherwise the path as given, which must exist."""
    if space is None:
        return SPACES_DIR / "quick.yaml"
    path = Path(space)
    if path.is_file():
        return path
    bundled = SPACES_DIR / f"{path.name}.yaml"
    if path.parent == Path(".") and not path.suffix and bundled.is_file():
        return bundled
    raise SpaceError(f"{path}: no such search space file (bundled spaces, usable by name: {', '.join(bundled_spaces())})")


def leaderboard_table(board, space: SearchSpace, top: int = 10) -> Table:
    table = Table(title=f"leaderboard (top {min(top, len(board))} of {len(board)})")
    columns = {"rank": "#", "trial_id": "trial", "seed_point": "seed point", "stop_reason": "stopped by",
               "epochs": "epochs", space.objective: "objective", "interval": "95% interval",
               "val_macro_precision": "macro precision",
               **{c: label for c, label in (("cost/params", "params (M)"), ("cost/latency_ms_b1", "ms/image")) if c in board}}
    for label in columns.values():
        table.add_column(label, no_wrap=True)
    table.add_column("parameters")
    params = [c for c in board.columns if c.startswith("param/")]
    for _, row in board.head(top).iterrows():
        cells = []
        for column in columns:
            if column == "interval":  # the objective's bootstrap interval over validation images
                low, high = plain(row.get(f"{space.objective}_low")), plain(row.get(f"{space.objective}_high"))
                cells.append("-" if low is None or high is None else f"{low:.2f}-{high:.2f}")
                continue
            value = plain(row.get(column))
            if column == "cost/params" and value is not None:
                value = value / 1e6
            cells.append("-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        sampled = {c.removeprefix("param/"): plain(row[c]) for c in params if plain(row[c]) is not None}
        table.add_row(*cells, _short(sampled))
    return table


def load_leaderboard(out: Path):
    import pandas as pd

    return pd.read_parquet(Path(out) / "leaderboard.parquet")

