"""`defect-tune search`: Ray Tune drives Optuna (TPE) and ASHA over trials that each fit a
TorchTrainer. The same command searches on a laptop (a local Ray cluster) and on a GPU cluster
(`--address`, shared `--storage`)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import ray
from ray import tune
from rich.console import Console

from defect_tune.core.config import selection_metric
from defect_tune.core.errors import check_writable
from defect_tune.core.units import clock
from defect_tune.data.folds import make_folds
from defect_tune.data.shards import check_shards, data_location, read_meta
from defect_tune.ray_compat import TUNE_CHECKPOINT_PERIOD_S, quiet_start_notices, start_data_stats_actor
from defect_tune.raytrain.cluster import start_ray
from defect_tune.search.console import SweepConsole
from defect_tune.search.leaderboard import build_leaderboard
from defect_tune.search.options import SearchError, SearchOptions
from defect_tune.search.records import (
    BUDGET_RECORD,
    BudgetCutoffs,
    budget_end_note,
    budget_for_sweep,
    check_time_budget,
    cut_off_trials,
    finish_interrupted_sync,
    folds_for_sweep,
    overrides_for_sweep,
    record_overrides,
)
from defect_tune.search.report_relay import start_report_relay
from defect_tune.search.resources import (
    check_gpu_options,
    folds_side_by_side,
    gpus_for_workers,
    trials_at_once,
    wait_for_release,
)
from defect_tune.search.results import write_results
from defect_tune.search.searcher import (
    STUDY_FILE,
    AshaAwareOptunaSearch,
    PointsFinishASHA,
    startup_trials,
    study_storage,
    tpe_sampler,
)
from defect_tune.search.space import DefineByRun, SearchSpace, load_space
from defect_tune.search.tracking import wandb_callbacks
from defect_tune.search.trial import TrialSetup, run_trial


def _storage(options: SearchOptions, out: Path) -> str:
    if options.storage is None:
        return str((out / "tune").absolute())
    if "://" in options.storage:
        return options.storage
    return str(Path(options.storage).absolute())


def _check_experiment(options: SearchOptions, out: Path, experiment: str, console: Console) -> None:
    """A new sweep needs a name no experiment or study holds; a resumed one needs its experiment,
    whose state a killed driver may have left cut short (repaired here, and said)."""
    if options.resume and (repaired := finish_interrupted_sync(experiment, options.name)):
        console.print(f"--resume: {repaired}", style="yellow", highlight=False, markup=False)
    if not options.resume and tune.Tuner.can_restore(experiment):
        raise SearchError(f"sweep {options.name!r} already exists at {experiment}; --resume continues it, or pick "
                          "another --name")
    if options.resume and not tune.Tuner.can_restore(experiment):
        raise SearchError(f"--resume: no sweep {options.name!r} to resume at {experiment}")
    if not options.resume and (out / STUDY_FILE).is_file():
        import optuna

        if options.name in optuna.study.get_all_study_names(study_storage(out)):
            raise SearchError(f"{out / STUDY_FILE} already holds a study named {options.name!r} (a sweep whose Tune "
                              "experiment is gone); --resume cannot continue it: pick another --name or --out")


def _new_tuner(trainable, space: SearchSpace, options: SearchOptions, out: Path, storage: str, concurrent: int,
               budget: float | None, callbacks: list) -> tune.Tuner:
    """A new sweep's Tuner: TPE proposing after the starting points, ASHA judging the proposals."""
    # With trade-offs, Optuna's TPE proposes for all of them (multi-objective); ASHA
    # stops trials on the objective alone.
    metric, mode = space.metrics if space.trade_offs else (selection_metric(space.objective), space.mode)
    startup = startup_trials(len(space.points), concurrent)
    searcher = AshaAwareOptunaSearch(
        space=DefineByRun(space), metric=metric, mode=mode,
        points_to_evaluate=[dict(p) for _, p in space.points] or None,
        sampler=tpe_sampler(startup, options.seed), study_name=options.name, max_epochs=space.max_epochs,
        storage=study_storage(out), point_names=[name for name, _ in space.points], startup=startup,
        grace_period=space.grace_period, budget_s=budget,
    )
    scheduler = PointsFinishASHA(
        points=[dict(p) for _, p in space.points],
        # Our own epoch count, not Tune's training_iteration: a trial restarted from its
        # Train checkpoint (after a failure or --resume) reports from where it left off,
        # while Tune's counter starts again at 1.
        time_attr="epoch", metric=selection_metric(space.objective), mode=space.mode, max_t=space.max_epochs,
        grace_period=space.grace_period, reduction_factor=space.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            num_samples=space.num_samples, max_concurrent_trials=concurrent, reuse_actors=False,
            time_budget_s=budget,
        ),
        run_config=tune.RunConfig(
            name=options.name, storage_path=storage, verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
        ),
    )


def _say_what_runs(console: Console, options: SearchOptions, space: SearchSpace, resources: dict, concurrent: int,
                   cv: int, budget: float | None, experiment: str) -> None:
    if cv:
        fold_note = folds_side_by_side(resources, options, cv)
        if fold_note:
            console.print(fold_note, highlight=False, markup=False)
    per_trial = f", each on {cv} folds of train+val" if cv else ""
    count = f"{space.num_samples} trials" if space.num_samples > 0 else "trials"
    until = f" until its time budget of {clock(budget)} runs out" if budget else ""
    console.print(
        f"sweep {options.name}: {count} of {Path(space.path).name}{per_trial}{until}, {concurrent} at a time on "
        f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs; Tune experiment {experiment}",
        highlight=False,
    )


def run_search(options: SearchOptions, console: Console | None = None) -> dict:
    """Run (or resume) a sweep; write the leaderboard and best config; return a summary."""
    console = console or Console(stderr=True)
    check_gpu_options(options)
    check_time_budget(options)
    out = (options.out or Path("results") / options.name).absolute()
    check_writable(out, "--out")  # the results of hours of trials go there: a read-only folder is named now
    space_overrides = overrides_for_sweep(options, out)
    space = load_space(options.space).with_overrides(space_overrides)
    if options.num_samples is not None:
        space = SearchSpace(**{**space.__dict__, "num_samples": options.num_samples})
    meta = read_meta(options.data)
    check_shards(options.data, meta)  # a missing or corrupt shard stops the sweep here, not trial by trial
    space, size_note = space.for_data(meta, options.upsample)
    for line in [size_note, *space.check_weights()]:  # a backbone without weights stops the sweep here
        if line:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    storage = _storage(options, out)
    experiment = f"{storage.rstrip('/')}/{options.name}"
    _check_experiment(options, out, experiment, console)
    record_overrides(options, out)

    # Save (and sync to storage) Tune's experiment state at every step, not every 10+ s ("auto"):
    # trial results reach the storage path only with that sync, so a driver killed right after a
    # trial finished would otherwise lose it (docs/design.md, "Tune saves its state at every step").
    os.environ.setdefault(TUNE_CHECKPOINT_PERIOD_S, "0")
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
        reports = start_report_relay()  # trials hand their reports on through it; it lives while this handle does
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
            callbacks = [progress, *cutoffs,
                         *wandb_callbacks(options.wandb_project, options.name, out, space, meta, console)]
            tuner = _new_tuner(trainable, space, options, out, storage, concurrent, budget, callbacks)
        _say_what_runs(console, options, space, resources, concurrent, cv, budget, experiment)
        results = tuner.fit()
        ray.kill(reports)  # every trial has ended
        cut_off = cut_off_trials(out)
        board = build_leaderboard(results, space, meta["classes"], cut_off)
        free, leftovers = wait_for_release(resources)
    finally:
        ray.shutdown()
    if leftovers:
        console.print(f"note: removed {leftovers} placement group(s) that Ray Train had not given back after their "
                      "trials ended (cut off or stopped); their resources are free again",
                      highlight=False, markup=False)
    if budget and (end_note := budget_end_note(board, space)):
        console.print(end_note, style="yellow", highlight=False, markup=False, soft_wrap=True)
    cv_record = {"folds": cv, "seed": fold_seed} if cv else None
    budget_record = {"seconds": budget, "cut_off": sorted(cut_off)} if budget else None
    return write_results(out, board, space, options, experiment, meta, time.perf_counter() - started, free, resources,
                         cv_record, gpu_memory, budget_record, leftovers)


