"""The search driver's own logic, without a sweep: concurrency, Optuna bookkeeping, leaderboard, and
the guard against a second local Ray cluster (which starts one tiny cluster)."""

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from defect_tune.core.config import SELECTION, selection_score
from defect_tune.core.leaderboard import ranked_by
from defect_tune.core.units import clock
from defect_tune.raytrain.cluster import LOCAL_CLUSTER_ENV, ClusterError, refuse_second_local_cluster, start_ray
from defect_tune.raytrain.errors import error_reason
from defect_tune.search.leaderboard import build_leaderboard
from defect_tune.search.options import SearchError, SearchOptions
from defect_tune.search.records import (
    BUDGET_RECORD,
    BudgetCutoffs,
    budget_end_note,
    budget_for_sweep,
    check_time_budget,
    cut_off_trials,
    resolve_cv,
)
from defect_tune.search.report_relay import ReportRelay
from defect_tune.search.resources import (
    GPU_MEMORY_FILL,
    check_gpu_options,
    fit_on_gpu,
    folds_side_by_side,
    gpu_share,
    gpus_for_workers,
    trials_at_once,
    wait_for_release,
)
from defect_tune.search.searcher import AshaAwareOptunaSearch
from defect_tune.search.space import DefineByRun, SpaceError, bundled_spaces, load_space, resolve_space
from defect_tune.search.trial import diverged_report

QUICK = Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml"


def options(**kwargs):
    return SearchOptions(data=Path("d"), space=QUICK, name="n", **kwargs)


def test_trials_at_once_leaves_cpus_unreserved_for_ray_data():
    assert trials_at_once({"CPU": 2}, options(cpus_per_worker=1)) == 1  # one worker CPU, one CPU for Data
    assert trials_at_once({"CPU": 2}, options()) == 2  # two half-CPU workers, one CPU for Data
    assert trials_at_once({"CPU": 16}, options(cpus_per_worker=1)) == 12
    assert trials_at_once({"CPU": 16}, options(workers_per_trial=2, cpus_per_worker=2)) == 3
    assert trials_at_once({"CPU": 16, "GPU": 1}, options(gpus_per_worker=0.25)) == 4  # four trials share a GPU
    assert trials_at_once({"CPU": 2}, options(max_concurrent=3)) == 3
    assert trials_at_once({"CPU": 1}, options(cpus_per_worker=1)) == 1  # no spare core: Data shares the worker's
    with pytest.raises(SearchError, match="cannot run one trial"):
        trials_at_once({"CPU": 1}, options(workers_per_trial=2, cpus_per_worker=1))
    with pytest.raises(SearchError, match="cannot run one trial"):
        trials_at_once({"CPU": 8}, options(gpus_per_worker=1))


def test_a_cross_validated_trial_reserves_its_folds_or_lets_them_take_turns():
    assert trials_at_once({"CPU": 16}, options(cpus_per_worker=1), folds=5) == 2  # 5 CPUs a trial, 4 left for Data
    assert trials_at_once({"CPU": 16, "GPU": 2}, options(gpus_per_worker=0.25), folds=4) == 2  # a GPU per trial
    assert trials_at_once({"CPU": 2}, options(cpus_per_worker=1), folds=5) == 1  # one fold at a time
    with pytest.raises(SearchError, match="cannot run one trial"):
        trials_at_once({"CPU": 8}, options(gpus_per_worker=1), folds=2)
    note = folds_side_by_side({"CPU": 2}, options(cpus_per_worker=0.5), 5)
    assert ("5 folds need 2.5 CPUs, more than the 1 left for workers" in note
            and "--cpus-per-worker 0.2 runs them side by side" in note)
    assert folds_side_by_side({"CPU": 16}, options(cpus_per_worker=1), 5) is None


def test_trials_per_gpu_sets_each_workers_share_so_that_they_all_fit():
    for count in (1, 2, 3, 4, 7, 12, 16, 30):
        share = gpu_share(count)
        assert count * share <= 1 and (count + 1) * share > 1  # exactly `count` fit on a GPU, no more
        assert trials_at_once({"CPU": 64, "GPU": 2}, options(gpus_per_worker=share)) == 2 * count
    assert gpu_share(3) == 0.3333


def test_auto_fits_the_hungriest_backbone_in_the_gpus_memory_or_says_which_does_not_fit():
    gib = 2**30
    assert (fit_on_gpu({"resnet18": 3 * gib, "efficientnet_b0": 5 * gib}, 80 * gib)
            == math.floor(GPU_MEMORY_FILL * 80 / 5))
    assert fit_on_gpu({"resnet18": 3 * gib}, 16 * gib) == 4
    with pytest.raises(SearchError, match=r"convnext_tiny takes 20\.0 GiB at the space's largest settings, "
                                          r"more than 85% of the GPU's 16\.0 GiB; lower the space's batch_size"):
        fit_on_gpu({"resnet18": 3 * gib, "convnext_tiny": 20 * gib}, 16 * gib)


def test_trials_per_gpu_values_that_cannot_work_are_refused_before_ray_starts():
    check_gpu_options(options(trials_per_gpu="auto"))
    check_gpu_options(options(trials_per_gpu=4))
    for value in (0, -2, "four", True):
        with pytest.raises(SearchError, match="--trials-per-gpu takes a positive number of workers per GPU "
                                              f"or auto, got {value!r}"):
            check_gpu_options(options(trials_per_gpu=value))
    with pytest.raises(SearchError,
                       match="--trials-per-gpu 4 sets each worker's GPU share; drop --gpus-per-worker 0.25"):
        check_gpu_options(options(trials_per_gpu=4, gpus_per_worker=0.25))


def test_sweeps_and_retrains_use_the_clusters_gpus_unless_told_otherwise():
    """--gpus-per-worker auto (the default): one GPU per worker where the cluster has GPUs, said on
    the console; none where it has none; 0 keeps a GPU cluster's trials on its CPUs."""
    import io

    from rich.console import Console

    from defect_tune.raytrain.cluster import gpus_per_worker

    shown = io.StringIO()
    console, space = Console(file=shown, width=300), load_space(QUICK)
    assert gpus_for_workers(options(), space, {}, {"CPU": 8, "GPU": 2}, console) == (1.0, None)
    assert "training on the cluster's 2 GPU(s), one per worker" in shown.getvalue()
    assert trials_at_once({"CPU": 16, "GPU": 2}, options()) == 2  # a GPU each
    assert trials_at_once({"CPU": 2}, options()) == 2  # no GPU: as on CPUs
    shown.truncate(0)
    assert gpus_for_workers(options(), space, {}, {"CPU": 8}, console) == (0.0, None)
    assert gpus_for_workers(options(gpus_per_worker=0), space, {}, {"CPU": 8, "GPU": 2}, console) == (0, None)
    assert "training on" not in shown.getvalue() and "trials use none" in shown.getvalue()
    assert gpus_per_worker("auto", {"CPU": 4, "GPU": 1}) == 1.0 and gpus_per_worker("auto", {"CPU": 4}) == 0.0
    assert gpus_per_worker(0.5, {"CPU": 4}) == 0.5
    check_gpu_options(options(trials_per_gpu=4))  # --trials-per-gpu with the default share
    for bad in (-1, math.nan, math.inf, "half", True):
        with pytest.raises(SearchError, match="--gpus-per-worker takes a share of a GPU"):
            check_gpu_options(options(gpus_per_worker=bad))


def test_a_time_budget_is_a_positive_duration_in_seconds_minutes_or_hours():
    from defect_tune.core.units import parse_duration

    for text, seconds in (("90s", 90), ("20m", 1200), ("1.5h", 5400), ("600", 600), ("0.5", 0.5), (" 2H ", 7200),
                          (".5m", 30)):
        assert parse_duration(text) == seconds
    for text in ("0", "0s", "-5", "-5m", "abc", "nan", "inf", "1e3", "", "5 m", "5d", "9" * 400):
        with pytest.raises(ValueError,
                           match=r"expected a positive duration such as 90s, 20m, 1\.5h or 600 \(seconds\)"):
            parse_duration(text)
    assert [clock(s) for s in (5400, 1200, 3600, 90, 60.4, 0.4)] == ["1h30m", "20m", "1h", "1m30s", "1m", "0s"]
    check_time_budget(options())
    check_time_budget(options(time_budget_s=1))
    for value in (0, -60, math.nan, math.inf, "20m", True):
        with pytest.raises(SearchError,
                           match=re.escape(f"--time-budget takes a positive number of seconds, got {value!r}")):
            check_time_budget(options(time_budget_s=value))


def test_a_time_budget_bounds_the_trial_count_unless_num_samples_is_given_and_resume_keeps_it(tmp_path):
    space = load_space(QUICK)
    assert budget_for_sweep(options(), space, tmp_path / "none") == (space, None, None)
    assert not (tmp_path / "none").exists()

    bounded, seconds, note = budget_for_sweep(options(time_budget_s=1200), space, tmp_path / "a")
    assert (bounded.num_samples, seconds, note) == (-1, 1200, None)  # -1: Tune starts trials until the budget runs out
    assert json.loads((tmp_path / "a" / BUDGET_RECORD).read_text()) == {
        "seconds": 1200, "num_samples": -1, "cut_off": []}
    counted, _, note = budget_for_sweep(options(time_budget_s=30, num_samples=5), replace(space, num_samples=5),
                                        tmp_path / "b")
    assert counted.num_samples == 5  # whichever runs out first
    assert (note.startswith("note: a time budget of 30s is short")
            and f"ASHA's first rung at epoch {space.grace_period}" in note)

    resumed, seconds, note = budget_for_sweep(options(resume=True), space, tmp_path / "a")
    assert (resumed.num_samples, seconds) == (-1, 1200) and "time budget of 20m starts again now" in note
    assert budget_for_sweep(options(resume=True, time_budget_s=1200.0), space, tmp_path / "a")[1] == 1200
    with pytest.raises(SearchError, match=r"--resume: sweep 'n' started with a time budget of 20m; "
                                          r"Tune keeps it, so drop --time-budget"):
        budget_for_sweep(options(resume=True, time_budget_s=600), space, tmp_path / "a")
    with pytest.raises(SearchError, match=r"--resume: sweep 'n' started with no time budget; Tune keeps it"):
        budget_for_sweep(options(resume=True, time_budget_s=600), space, tmp_path / "none")
    assert budget_for_sweep(options(resume=True), space, tmp_path / "none") == (space, None, None)


def test_the_trials_the_time_budget_cut_off_are_those_tune_ended_without_completing(tmp_path):
    """Tune calls on_trial_complete for a trial that finished or that ASHA stopped, not for those
    it ends when the budget runs out; a resumed run's trials finished before are not cut off."""
    record = tmp_path / BUDGET_RECORD
    record.write_text(json.dumps({"seconds": 60, "num_samples": -1, "cut_off": ["old"]}))

    def trial(trial_id, status):
        return SimpleNamespace(trial_id=trial_id, status=status)

    cutoffs = BudgetCutoffs(record)
    cutoffs.setup()
    cutoffs.on_step_begin(0, [trial("old", "TERMINATED"), trial("done", "TERMINATED"), trial("again", "PENDING")])
    cutoffs.on_step_begin(1, [])  # only the first step says which trials had finished
    cutoffs.on_trial_complete(2, [], trial("finished", "RUNNING"))
    cutoffs.on_trial_complete(3, [], trial("asha", "RUNNING"))
    ended = [trial(i, "TERMINATED") for i in ("old", "done", "finished", "asha", "again", "running", "waiting")]
    cutoffs.on_experiment_end(ended + [trial("crashed", "ERROR"), trial("interrupted", "RUNNING")])
    assert cut_off_trials(tmp_path) == {"old", "again", "running", "waiting"}

    resumed = BudgetCutoffs(record)  # a resumed sweep that had used up its budget: Tune runs no step
    resumed.setup()
    resumed.on_experiment_end([trial("done", "TERMINATED")])
    assert cut_off_trials(tmp_path) == {"old", "again", "running", "waiting"}
    assert cut_off_trials(tmp_path / "elsewhere") == frozenset()


def test_a_trial_cut_off_by_the_time_budget_keeps_the_epochs_it_reported():
    space = load_space(QUICK)
    full = space.max_epochs
    results = [
        fake_result({"id": "a", "model": "el_cnn", "lr": 0.001}, full, [0.1 * (e + 1) for e in range(full)], index=1),
        fake_result({"id": "b", "model": "el_cnn", "lr": 0.002}, full - 1, [0.3] * (full - 1), index=2),
        fake_result({"id": "c", "model": "el_cnn", "lr": 0.003}, 1, [0.2], index=3),
        SimpleNamespace(config={"model": "el_cnn", "lr": 0.0005}, metrics={"trial_id": "d"}, metrics_dataframe=None,
                        error=None, path="/x/run_trial_d_4_lr=0.0005"),
    ]
    board = build_leaderboard(results, space, ["a"], cut_off=frozenset({"a", "b", "d"})).set_index("trial_id")
    assert board["stop_reason"].to_dict() == {"a": "completed", "b": "time_budget", "c": "asha", "d": "time_budget"}
    assert board.loc["b", "epochs"] == full - 1 and board.loc["b", "val_guarded_macro_recall"] == 0.3
    assert board.loc["d", "epochs"] == 0 and board.loc["d", "status"] == "terminated"
    assert budget_end_note(board, space) is None  # trials got past ASHA's first rung
    early = build_leaderboard(results[3:], space, ["a"], cut_off=frozenset({"d"}))
    assert "before any trial reached ASHA's first rung" in budget_end_note(early, space)


def test_the_memory_measured_for_auto_is_each_backbone_at_the_spaces_largest_settings(tmp_path, synthetic_data):
    import torch

    from defect_tune.data.shards import read_meta
    from defect_tune.training.train import training_steps

    path = tmp_path / "space.yaml"
    path.write_text(
        "num_samples: 4\nmax_epochs: 2\nfixed: {augment: light}\n"
        "params:\n"
        "  model: {choice: [el_cnn, resnet18, el_cnn]}\n"
        "  batch_size: {choice: [32, 8, 16]}\n"
        "  cbam: {choice: [false, true]}\n"
        "  head: {choice: [linear, mlp]}\n"
        "  head_hidden: {int: [16, 48], when: {head: mlp}}\n"
        "  freeze_epochs: {choice: [0, 1]}\n"
    )
    configs = load_space(path).largest_configs()
    assert [c.model for c in configs] == ["el_cnn", "resnet18"]
    assert {(c.batch_size, c.cbam, c.head, c.head_hidden) for c in configs} == {(32, True, "mlp", 48)}
    fixed = load_space(QUICK).largest_configs()  # a space that searches none of them keeps the defaults
    assert [(c.model, c.batch_size, c.cbam) for c in fixed] == [
        (m, 32, False) for m in load_space(QUICK).values_of("model")]

    # What the GPU measurement runs, run here on the CPU: the largest settings build and train,
    # on images of the data's size, with the backbone trainable even in a trial that freezes it.
    meta = read_meta(synthetic_data)
    for config in configs:
        config = config.model_copy(update={"freeze_epochs": 1})
        row = training_steps(config, meta, torch.device("cpu"), steps=2)
        assert math.isfinite(row["train_loss"]) and "nonfinite" not in row
        assert row["trainable"] == row["total"]


@pytest.mark.slow  # starts a local Ray cluster
def test_trials_per_gpu_needs_a_gpu_and_auto_measures_on_one(synthetic_data, monkeypatch):
    """On a cluster that offers Ray a GPU; this machine has none for torch, so the measurement
    that runs on it says so, naming the node."""
    import io

    import ray
    from rich.console import Console

    from defect_tune.data.shards import read_meta

    space, meta = load_space(QUICK), read_meta(synthetic_data)
    console = Console(file=io.StringIO(), width=200)
    with pytest.raises(SearchError, match=r"--trials-per-gpu auto: the cluster has no GPUs \(where an autoscaler "
                                          r"adds GPU nodes as trials wait, pass --max-concurrent\)"):
        gpus_for_workers(options(trials_per_gpu="auto"), space, meta, {"CPU": 2}, console)
    assert (gpus_for_workers(options(trials_per_gpu=4, max_concurrent=16), space, meta, {"CPU": 2}, console)
            == (0.25, None))
    assert gpus_for_workers(options(), space, meta, {"CPU": 2}, console) == (0.0, None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
    try:
        resources = ray.cluster_resources()
        assert gpus_for_workers(options(), space, meta, resources, console) == (1.0, None)
        assert "training on the cluster's 1 GPU(s), one per worker" in console.file.getvalue()
        assert gpus_for_workers(options(gpus_per_worker=0), space, meta, resources, console) == (0, None)
        assert ("the cluster has 1 GPU(s) and trials use none; --trials-per-gpu auto trains on them"
                in console.file.getvalue())
        assert gpus_for_workers(options(trials_per_gpu=4), space, meta, resources, console) == (0.25, None)
        with pytest.raises(SearchError, match=r"--trials-per-gpu auto: measuring the backbones failed: "
                                              r".*RuntimeError\(.node [0-9.]+ offers Ray a GPU, "
                                              r"but torch sees no CUDA device"):
            gpus_for_workers(options(trials_per_gpu="auto"), space, meta, resources, console)
        free, removed = wait_for_release(resources, timeout=30)
        assert (free.get("GPU"), free.get("CPU"), removed) == (1, 2, 0)  # the measurement gave its GPU and CPU back
    finally:
        ray.shutdown()


def meta_with_val(**positives):
    classes = list(positives)
    return {"classes": classes, "splits": {
        "train": {"positives": {c: 10 * n + 1 for c, n in positives.items()}},
        "val": {"positives": positives}, "test": {"positives": positives}}}


def test_cv_is_recommended_when_a_class_has_few_validation_positives_and_auto_turns_it_on():
    rare = meta_with_val(crack=40, finger=2, corrosion=4)
    folds, advice = resolve_cv(0, rare)
    assert folds == 0 and advice.startswith("warning") and "finger 2, corrosion 4" in advice and "--cv 5" in advice
    assert "crack" not in advice
    assert resolve_cv("auto", rare)[0] == 5
    common = meta_with_val(crack=40, finger=5)
    assert resolve_cv(0, common) == (0, None)
    assert resolve_cv("auto", common)[0] == 0
    assert resolve_cv(3, common) == (3, None)
    with pytest.raises(SearchError, match="--cv must be"):
        resolve_cv(1, common)


def test_asha_stopped_trials_reach_optuna_as_pruned():
    space = load_space(QUICK)
    searcher = AshaAwareOptunaSearch(
        space=DefineByRun(space), metric=space.objective, mode="max", seed=0, max_epochs=space.max_epochs
    )
    searcher.suggest("stopped")
    searcher.suggest("finished")
    searcher.suggest("patience")
    searcher.suggest("crashed")
    searcher.suggest("short")
    searcher.on_trial_result("stopped", {space.objective: 0.3, "training_iteration": 1, "epoch": 1})
    searcher.on_trial_complete("stopped", {space.objective: 0.3, "training_iteration": 1, "epoch": 1})
    # Restarted from a checkpoint at epoch 2: Tune's iteration says 2, the trial's epoch says 4.
    searcher.on_trial_complete("finished", {space.objective: 0.5, "training_iteration": 2, "epoch": space.max_epochs})
    searcher.on_trial_complete("patience", {space.objective: 0.4, "training_iteration": 2, "epoch": 2,
                                            "early_stopped": True})
    searcher.on_trial_complete("crashed", None, error=True)
    # Its own searched epoch budget (2) ended before max_epochs: complete, not pruned.
    searcher.on_trial_complete("short", {space.objective: 0.45, "training_iteration": 2, "epoch": 2,
                                         "planned_epochs": 2})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert searcher._ot_study.trials[1].value == 0.5
    # The last result reaches the study as that trial's last epoch value too (Tune sends it to
    # on_trial_complete only), once: "stopped" had it from on_trial_result already.
    assert [t.intermediate_values for t in searcher._ot_study.trials[:2]] == [{1: 0.3}, {2: 0.5}]


def fake_result(config, epochs, objective, error=None, early=False, checkpoint=None, index=0, planned=None, ap=None):
    """A Tune result with one history row per epoch; `ap`: each epoch's validation macro AP, which
    adds the selection score (a sweep from before it has neither)."""
    history = pd.DataFrame({
        "training_iteration": list(range(1, epochs + 1)),
        "epoch": list(range(1, epochs + 1)),
        "val_guarded_macro_recall": objective,
        "val_guarded_macro_recall_low": [value - 0.1 for value in objective],
        "val_guarded_macro_recall_high": [value + 0.1 for value in objective],
        "val_macro_precision": [0.6] * epochs,
        "val_recall/a": [0.9] * epochs,
        "val_recalled/a": list(range(1, epochs + 1)),
        "val_positives/a": [6] * epochs,
        "checkpoint_path": [checkpoint] * epochs,
        "node_id": ["n1"] * epochs,
        "time_total_s": [10.0 * (i + 1) for i in range(epochs)],
    })
    if ap is not None:
        history["val_macro_ap"] = ap
        history[SELECTION] = [selection_score(o, a) for o, a in zip(objective, ap)]
    metrics = {"trial_id": config["id"], "early_stopped": early}
    if planned is not None:
        metrics["planned_epochs"] = planned
    return SimpleNamespace(config={k: v for k, v in config.items() if k != "id"}, metrics=metrics,
                           metrics_dataframe=history, error=error,
                           path=f"/x/run_trial_{config['id']}_{index}_lr={config.get('lr')}")


def test_a_trial_that_ran_its_own_searched_epochs_completed_and_one_stopped_short_of_them_did_not():
    space = load_space(QUICK)  # max_epochs 4
    results = [fake_result({"id": "own", "model": "el_cnn", "epochs": 2, "lr": 0.001}, 2, [0.3, 0.4], planned=2),
               fake_result({"id": "cut", "model": "el_cnn", "epochs": 3, "lr": 0.002}, 2, [0.3, 0.5], planned=3)]
    board = build_leaderboard(results, space, ["a"]).set_index("trial_id")
    assert board["stop_reason"].to_dict() == {"own": "completed", "cut": "asha"}


def test_leaderboard_ranks_by_best_epoch_and_names_stop_reasons():
    space = load_space(QUICK)  # max_epochs 4
    seed = {"model": "el_cnn", "loss": "weighted_bce", "class_weight_exponent": 0.5, "lr": 1.0e-3}
    results = [
        fake_result({"id": "a", **seed}, 4, [0.2, 0.5, 0.7, 0.6], checkpoint="/ckpt/a", index=1),
        fake_result({"id": "b", "model": "steel_cnn", "loss": "bce", "lr": 0.002}, 1, [0.3], index=3),
        fake_result({"id": "c", "model": "el_cnn", "loss": "asl", "asl_gamma_neg": 2.0, "lr": 0.001}, 2, [0.1, 0.75],
                    early=True, index=2),
        SimpleNamespace(config={"model": "el_cnn"}, metrics={"trial_id": "d"}, metrics_dataframe=None,
                        error=RuntimeError("boom"), path="/x/run_d"),
    ]
    board = build_leaderboard(results, space, ["a"])
    assert board["trial_id"].tolist() == ["c", "a", "b", "d"]
    assert board["rank"].tolist() == [1, 2, 3, 4]
    assert board["stop_reason"].tolist() == ["early_stopping", "completed", "asha", "error"]
    a = board.set_index("trial_id").loc["a"]
    assert a["val_guarded_macro_recall"] == 0.7 and a["best_epoch"] == 3 and a["epochs"] == 4
    assert a["starting_point"] == "el_seed" and a["checkpoint"] == "/ckpt/a" and a["wall_seconds"] == 40.0
    # The best epoch's interval and counts, and the Wilson interval of 3 recalled of 6 positives.
    assert (a["val_guarded_macro_recall_low"] == pytest.approx(0.6)
            and a["val_guarded_macro_recall_high"] == pytest.approx(0.8))
    assert (a["val_recalled/a"], a["val_positives/a"]) == (3, 6)
    assert [a["val_recall_low/a"], a["val_recall_high/a"]] == pytest.approx([0.1876, 0.8124], abs=1e-4)
    assert board.set_index("trial_id").loc["d", "error"] == "RuntimeError: boom"
    assert pd.isna(board.set_index("trial_id").loc["b", "param/class_weight_exponent"])
    # The start order, from the trial folder's name; unknown when the folder does not say.
    indices = board.set_index("trial_id")["trial_index"]
    assert indices[["a", "b", "c"]].tolist() == [1, 3, 2] and pd.isna(indices["d"])


def test_a_diverged_trial_is_a_failed_row_naming_its_loss_and_is_never_exported(tmp_path):
    """A trial whose loss turned NaN ended itself with a report of the objective's worst value and
    the loss: the leaderboard counts it failed, with that reason, even where its best epoch before
    the divergence beats every other trial, and the export passes over it."""
    from defect_tune.core.leaderboard import pick

    space = load_space(QUICK)
    diverged = fake_result({"id": "a", "model": "el_cnn", "lr": 0.003}, 2, [0.9, 0.0])
    diverged.metrics["diverged"] = "NonFiniteLoss: epoch 2, batch 4: training loss is nan"
    fine = fake_result({"id": "b", "model": "el_cnn", "lr": 0.001}, 3, [0.2, 0.3, 0.4])
    board = build_leaderboard([diverged, fine], space, ["a"]).set_index("trial_id", drop=False)
    assert board["trial_id"].tolist() == ["b", "a"] and board["rank"].tolist() == [1, 2]  # failed: ranked last
    assert board.loc["a", "status"] == "error" and board.loc["a", "stop_reason"] == "error"
    assert board.loc["a", "error"] == "NonFiniteLoss: epoch 2, batch 4: training loss is nan"
    assert board.loc["b", "status"] == "terminated" and pd.isna(board.loc["b", "error"])
    assert pick(board.reset_index(drop=True), space.objective, space.mode, 1, tmp_path)["trial_id"] == "b"


def test_trials_and_epochs_tied_on_the_objective_rank_by_validation_ap(tmp_path):
    """Two trials that both reach a guarded recall of 1.0: the one whose best epoch has the higher
    validation AP ranks first, its best epoch is the tied one with the higher AP (not the first to
    reach 1.0), and a higher recall still beats any AP."""
    from defect_tune.core.leaderboard import pick

    space = load_space(QUICK)
    results = [fake_result({"id": "first", "model": "el_cnn", "lr": 0.001}, 3, [0.9, 1.0, 1.0], ap=[0.99, 0.90, 0.93],
                           index=0),
               fake_result({"id": "later", "model": "el_cnn", "lr": 0.002}, 3, [1.0, 1.0, 0.95], ap=[0.91, 0.97, 0.99],
                           index=1),
               fake_result({"id": "lower", "model": "el_cnn", "lr": 0.003}, 2, [0.5, 0.98], ap=[1.0, 1.0], index=2)]
    board = build_leaderboard(results, space, ["a"])
    assert board["trial_id"].tolist() == ["later", "first", "lower"]
    best = board.set_index("trial_id")
    assert best.loc["later", "best_epoch"] == 2 and best.loc["first", "best_epoch"] == 3
    assert best.loc["later", "val_guarded_macro_recall"] == 1.0 and best.loc["later", "val_macro_ap"] == 0.97
    assert ranked_by(board, space.objective) == SELECTION
    assert pick(board, ranked_by(board, space.objective), space.mode, 1, tmp_path)["trial_id"] == "later"


def test_a_diverged_trial_reports_its_objectives_worst_value():
    assert diverged_report("val_guarded_macro_recall", "max") == {"val_guarded_macro_recall": 0.0,
                                                                  "val_selection_score": 0.0}
    assert diverged_report("val_loss", "min") == {"val_loss": math.inf}


def test_resume_copies_the_sweep_state_again_when_a_killed_driver_left_it_cut_short(tmp_path, monkeypatch):
    """What the resume test once met: the driver was SIGKILLed while Tune copied its
    state to the storage folder, leaving `experiment_state-*.json` at 0 bytes, and Tune resumed
    from nothing (the two finished trials were gone from the leaderboard). The driver's staging
    folder under Ray's temp dir still held the whole copy, as laid out here (Ray 2.60's layout)."""
    from defect_tune.search.records import finish_interrupted_sync

    experiment = tmp_path / "storage" / "sweep"
    (experiment / "run_trial_a_1").mkdir(parents=True)
    (experiment / "experiment_state-2026-11-30_21-43-14.json").write_text("")
    (experiment / "run_trial_a_1" / "progress.csv").write_text("epoch\n1\n")  # cut short too
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    with pytest.raises(SearchError, match=r"experiment_state-2026-11-30_21-43-14.json: empty or not valid JSON.*"
                                          r"run_trial_\*/ \(progress.csv\)"):
        finish_interrupted_sync(str(experiment), "sweep")

    staged = (tmp_path / "tmp" / "ray" / "session_2026-11-30_21-43-05_1_2" / "artifacts" / "2026-11-30_21-43-14"
              / "sweep" / "driver_artifacts")
    (staged / "run_trial_a_1").mkdir(parents=True)
    (staged / "experiment_state-2026-11-30_21-43-14.json").write_text('{"trial_data": []}')
    (staged / "run_trial_a_1" / "progress.csv").write_text("epoch\n1\n2\n")
    said = finish_interrupted_sync(str(experiment), "sweep")
    assert said and "had been cut short" in said and str(staged) in said
    assert json.loads((experiment / "experiment_state-2026-11-30_21-43-14.json").read_text()) == {"trial_data": []}
    assert (experiment / "run_trial_a_1" / "progress.csv").read_text() == "epoch\n1\n2\n"
    assert finish_interrupted_sync(str(experiment), "sweep") is None  # whole now: nothing to do
    assert finish_interrupted_sync("s3://bucket/sweep", "sweep") is None  # object stores write whole objects


@pytest.mark.slow  # starts a local Ray cluster
def test_a_second_local_cluster_is_refused_with_the_running_address(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        address = ray.get_runtime_context().gcs_address
        with pytest.raises(ClusterError,
                           match=f"already running on this machine \\(.*{re.escape(address)}.*\\); pass --address"):
            refuse_second_local_cluster(None)
        refuse_second_local_cluster(address)  # connecting to it is fine
        monkeypatch.setenv("RAY_ADDRESS", address)  # a Ray job's driver: Ray says which cluster
        refuse_second_local_cluster(None)
    finally:
        ray.shutdown()


def test_a_local_cluster_started_here_gets_its_settings_and_this_process_keeps_none(monkeypatch):
    """start_ray hands LOCAL_CLUSTER_ENV to the processes of a local cluster it starts (they inherit
    the environment at ray.init), never to a cluster it connects to, and never overrides the user."""
    import defect_tune.raytrain.cluster as search

    seen = []

    def init(address, **_):  # what the cluster's processes would inherit
        seen.append((address, {key: os.environ.get(key) for key in LOCAL_CLUSTER_ENV}))

    monkeypatch.setattr(search.ray, "init", init)
    monkeypatch.setattr(search, "refuse_second_local_cluster", lambda address: None)
    for key in LOCAL_CLUSTER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start_ray(None, configure_logging=False)
    assert seen[-1] == (None, LOCAL_CLUSTER_ENV) == (None, {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                                           "RAY_idle_worker_killing_time_threshold_ms": "60000"})
    assert not any(key in os.environ for key in LOCAL_CLUSTER_ENV)  # restored
    start_ray("10.0.0.1:6379")
    assert seen[-1] == ("10.0.0.1:6379", {key: None for key in LOCAL_CLUSTER_ENV})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a Ray job's driver
    start_ray(None)
    assert seen[-1] == (None, {key: None for key in LOCAL_CLUSTER_ENV})
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # the user's own setting
    start_ray(None)
    assert seen[-1] == (None, {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
                               "RAY_idle_worker_killing_time_threshold_ms": "60000"})
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


# ---------------------------------------------------------------- the bundled search spaces


def test_spaces_are_found_by_name_or_path_and_a_missing_one_lists_the_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the bundled spaces come from the installed package
    assert resolve_space(None).read_bytes() == QUICK.read_bytes()
    assert resolve_space("el_solar").read_bytes() == (QUICK.parent / "el_solar.yaml").read_bytes()
    assert bundled_spaces() == sorted(p.stem for p in QUICK.parent.glob("*.yaml"))
    mine = tmp_path / "el_solar.yaml"  # a file of the user's wins over the bundled space of that name
    mine.write_text("num_samples: 1\n")
    assert resolve_space(Path("el_solar.yaml")) == Path("el_solar.yaml")
    with pytest.raises(SpaceError, match=r"^steel2: no such search space file "
                                         r"\(bundled spaces, usable by name: defects, el_solar, full, quick, steel\)"):
        resolve_space("steel2")
    with pytest.raises(SpaceError, match="^configs/quick: no such search space file"):
        resolve_space("configs/quick")  # a path is a path, never a bundled name


def test_a_wheel_carries_the_search_spaces(tmp_path):
    """`pip install defect-tune` (not editable) still has the default space: build the wheel the
    way pip does, offline, and look inside."""
    root = QUICK.parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("defect_tune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = {f"defect_tune/search_spaces/{p.name}" for p in QUICK.parent.glob("*.yaml")}
    assert {"defect_tune/search_spaces/quick.yaml", "defect_tune/cli.py"} <= names and spaces <= names


def test_a_failed_trials_reason_is_its_root_cause_not_rays_wrapper():
    wrapped = (
        "RayTaskError(WorkerGroupError): ray::ImplicitFunc.train() (pid=14755, ip=192.0.2.2)\n"
        "  File \"/venv/ray/air/_internal/util.py\", line 98, in run\n    self._ret = self._target(*self._args)\n"
        "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
        "Traceback (most recent call last):\n"
        "  File \"/work/defect_tune/training/train.py\", line 154, in train_one_epoch\n"
        "    raise NonFiniteLoss(f\"epoch {epoch + 1}, batch {step + 1}: training loss is {loss.item()}\")\n"
        "defect_tune.training.train.NonFiniteLoss: epoch 1, batch 4: training loss is nan\n"
    )
    assert error_reason(wrapped) == "NonFiniteLoss: epoch 1, batch 4: training loss is nan"
    assert error_reason(RuntimeError("boom")) == "RuntimeError: boom"
    assert error_reason(ValueError("first line\nsecond")) == "ValueError: first line"
    assert len(error_reason(RuntimeError("x" * 2000))) == 500


def test_a_resumed_sweep_keeps_the_folds_it_started_with(tmp_path):
    from defect_tune.search.records import folds_for_sweep

    space = load_space(QUICK)
    rare = meta_with_val(crack=40, finger=2)
    out = tmp_path / "out"
    assert folds_for_sweep(options(cv=5, seed=3), space, rare, out)[:2] == (5, 3)
    # Resumed without --cv, or with another --seed: the same 5 folds, drawn with seed 3.
    assert folds_for_sweep(options(resume=True, seed=0), space, rare, out) == (5, 3, None)
    assert folds_for_sweep(options(resume=True, cv="auto"), space, rare, out)[:2] == (5, 3)
    with pytest.raises(SearchError, match="started with --cv 5 .* cannot continue with --cv 0"):
        folds_for_sweep(options(resume=True, cv=0), space, rare, out)
    # A sweep from before folds were recorded ran on prepare's split.
    assert folds_for_sweep(options(resume=True), space, rare, tmp_path / "older") == (0, 0, None)


def test_a_kept_shard_gives_every_image_once_per_epoch_in_a_new_order_with_its_labels():
    import numpy as np
    import torch

    from defect_tune.core.config import TrainConfig
    from defect_tune.data.augment import build_augmentation
    from defect_tune.data.shards import to_tensor
    from defect_tune.training.engine import memory_batches

    images = (np.arange(10, dtype=np.uint8) * 20).repeat(16).reshape(10, 4, 4)  # image k is all 20k
    labels = np.stack([np.arange(10), np.zeros(10), np.ones(10)], axis=1).astype(np.float32)  # row k: [k, 0, 1]
    rng = np.random.default_rng(0)
    orders = []
    for drop_last, sizes in ((True, [4, 4]), (False, [4, 4, 2])):
        batches = list(memory_batches(images, labels, TrainConfig(batch_size=4), drop_last, rng))
        assert [len(y) for _, y in batches] == sizes
        order = []
        for x, y in batches:
            assert x.shape[1:] == (1, 4, 4) and x.dtype == torch.float32
            for image, row in zip(x, y):
                k = int(row[0])
                assert torch.equal(row, torch.from_numpy(labels[k]))
                assert torch.equal(image, to_tensor(images[k:k + 1])[0])  # each image keeps its own labels
                order.append(k)
        assert len(set(order)) == len(order)
        orders.append(order)
    assert sorted(orders[1]) == list(range(10))  # without drop_last: every image once
    assert orders[0] != orders[1][:8]  # a new order each epoch

    ramp = np.tile(np.arange(4, dtype=np.uint8) * 60, (4, 1))  # left to right: 0, 60, 120, 180
    flip = build_augmentation("hflip", (4, 4), seed=1)
    flip.transforms[0].p = 1.0
    (x, _), = memory_batches(ramp[None].repeat(2, 0), labels[:2], TrainConfig(batch_size=2), False, rng, flip)
    assert torch.equal(x[0, 0], to_tensor(ramp[:, ::-1].copy()[None])[0, 0])  # augmented here, in the worker


def test_a_worker_keeps_its_train_shard_only_when_the_shard_fits_the_limit():
    from defect_tune.raytrain.loop import keeps_train

    meta = {"image": {"height": 100, "width": 100}, "splits": {"train": {"images": 1000}, "val": {"images": 200}}}
    assert keeps_train(meta, 1, 10_000_000)  # 1,000 images of 10,000 bytes
    assert not keeps_train(meta, 1, 9_999_999)
    assert keeps_train(meta, 2, 5_000_000)  # two workers, half each
    assert not keeps_train(meta, 1, 10_000_000, ("train", "val"))
    assert not keeps_train(meta, 1, 0)  # --keep-train-gb 0: always streamed


def test_the_report_relay_hands_each_trial_its_own_reports_in_order_and_waits_for_the_first():
    async def run() -> None:
        reports = ReportRelay()
        assert await reports.take("trial", 0) == []
        assert await reports.take("trial", 0.1) == []  # waited, and nothing came
        for item in ("epoch 1", "epoch 2"):
            await reports.put("trial", item)
        await reports.put("other", "its epoch 1")
        assert await reports.take("trial", 0) == ["epoch 1", "epoch 2"]
        assert await reports.take("trial", 0) == []  # taken once
        waiting = asyncio.create_task(reports.take("late", 30))
        await asyncio.sleep(0.05)
        await reports.put("late", "epoch 1")
        assert await asyncio.wait_for(waiting, 10) == ["epoch 1"]  # woken by the put, well before its 30 s
        assert await reports.is_open("other")
        await reports.close("other")
        assert await reports.take("other", 0) == []  # a closed trial's leftovers are gone
        assert not await reports.is_open("other")  # its --cv folds stop after their epoch
        await reports.put("other", "a fold's late epoch")
        assert await reports.take("other", 0) == []  # dropped, not queued for nobody

    asyncio.run(run())


def test_the_report_relay_process_imports_neither_torch_nor_the_training_core():
    """Its actor process imports the module that defines it: that must stay light."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, defect_tune.search.report_relay; "
                             "print(sorted(m for m in ('torch', 'defect_tune.search.trial', "
                             "'defect_tune.training.train') if m in sys.modules))"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_the_sweep_console_prints_a_line_per_event_with_where_the_sweep_stands(tmp_path):
    import io
    import pickle
    from types import SimpleNamespace

    from rich.console import Console

    from defect_tune.search.console import SweepConsole

    space = load_space(QUICK)
    for terminal in (False, True):
        shown = io.StringIO()
        view = SweepConsole(space, Console(file=shown, force_terminal=terminal, width=300))
        view.setup()
        assert (view.live is not None) == terminal  # a live status line on a terminal only
        first, second = (SimpleNamespace(trial_id=t, config={"lr": 0.001, "model": "el_cnn"}, local_path=f"/tune/{t}")
                         for t in ("aaa", "bbb"))
        for trial in (first, second):
            view.on_trial_start(0, [], trial)
        objective = space.objective
        view.on_trial_result(0, [], first, {"epoch": 1, objective: 0.5, "planned_epochs": 4})
        view.on_trial_complete(0, [], first)  # stopped between epochs: ASHA
        for epoch in range(1, 5):
            view.on_trial_result(0, [], second, {"epoch": epoch, objective: 0.6 + epoch / 20, f"{objective}_low": 0.7,
                                                  f"{objective}_high": 0.9, "planned_epochs": 4})
        view.on_trial_complete(0, [], second)
        view.on_experiment_end([])
        assert view.live is None
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.getvalue())  # the live line's cursor moves and colours
        lines = [line for line in re.split(r"[\r\n]", plain) if line.startswith("[")]
        if terminal:
            assert any(line.startswith("sweep: 2/8 finished") for line in re.split(r"[\r\n]", plain))
        assert lines[0] == "[start 1/8] aaa lr=0.001 model=el_cnn" and lines[2] == f"[epoch 1/4] aaa {objective}=0.5000"
        assert lines[3].startswith("[done] aaa stopped by ASHA after epoch 1: 0.5000. 1/8 finished "
                                   "(1 stopped by ASHA); 1 running")
        assert lines[-1].startswith("[done] bbb completed 4 epochs: 0.8000 (0.700-0.900). 2/8 finished (1 completed, "
                                    "1 stopped by ASHA); 0 running; best bbb 0.8000 (0.700-0.900); ")
        assert "elapsed; about " in lines[-1] and lines[-1].endswith(" left")
        assert "TERMINATED" not in plain and "┃" not in plain  # no table reprinted per trial
    worse = SimpleNamespace(trial_id="ccc", config={}, local_path="/tune/ccc")
    view.on_trial_start(0, [], worse)
    view.on_trial_result(0, [], worse, {"epoch": 1, space.objective: 0.9, "val_selection_score": 0.9,
                                        "planned_epochs": 2})
    view.on_trial_result(0, [], worse, {"epoch": 2, space.objective: 0.7, "val_selection_score": 0.7,
                                        "planned_epochs": 2})
    # its best epoch counts, as on the leaderboard
    assert view.rows["ccc"]["objective"] == 0.9 and view.best()[0] == "ccc"
    diverged = SimpleNamespace(trial_id="ddd", config={}, local_path="/tune/ddd")
    view.on_trial_start(0, [], diverged)
    view.on_trial_result(0, [], diverged, {"epoch": 1, space.objective: 0.0, "planned_epochs": 2,
                                           "diverged": "NonFiniteLoss: epoch 1, batch 4: training loss is nan"})
    view.on_trial_complete(0, [], diverged)  # it ends itself with that report: a failure, not an ASHA stop
    said = shown.getvalue().splitlines()[-1]
    assert said.startswith("[done] ddd failed after epoch 1 (NonFiniteLoss: epoch 1, batch 4: training loss is nan)")
    assert "1 failed" in said and view.rows["ddd"]["state"] == "error" and view.best()[0] == "ccc"
    restored = pickle.loads(pickle.dumps(view))  # Tune pickles its callbacks with the experiment state
    assert restored.rows == view.rows and restored.live is None and restored.console is not None
    assert [clock(s) for s in (5, 192, 3900)] == ["5s", "3m12s", "1h05m"]


def test_paths_inside_the_results_folder_are_kept_relative_and_read_back_from_wherever_it_is(tmp_path):
    from defect_tune.core.leaderboard import from_results, in_results, paths_in_results

    results = tmp_path / "results" / "sweep"
    inside = results / "tune" / "train" / "sweep-a" / "checkpoint_000002"
    assert in_results(str(inside), results) == "tune/train/sweep-a/checkpoint_000002"
    assert in_results("/elsewhere/checkpoint", results) == "/elsewhere/checkpoint"  # --storage on another disk
    assert in_results("s3://bucket/sweep/checkpoint", results) == "s3://bucket/sweep/checkpoint"
    assert in_results(None, results) is None
    moved = tmp_path / "moved"
    assert (from_results("tune/train/sweep-a/checkpoint_000002", moved)
            == str(moved / "tune/train/sweep-a/checkpoint_000002"))
    assert from_results("/elsewhere/checkpoint", moved) == "/elsewhere/checkpoint"  # an older sweep's absolute path
    assert from_results("gs://b/c", moved) == "gs://b/c"
    board = pd.DataFrame({"checkpoint": [str(inside), None],
                          "fold_predictions": [json.dumps([str(results / "tune/f/fold0.npz"), "s3://b/fold1.npz"]),
                                               None]})
    kept = paths_in_results(board, results)
    assert kept["checkpoint"][0] == "tune/train/sweep-a/checkpoint_000002" and pd.isna(kept["checkpoint"][1])
    assert (json.loads(kept["fold_predictions"][0]) == ["tune/f/fold0.npz", "s3://b/fold1.npz"]
            and pd.isna(kept["fold_predictions"][1]))
    assert board["checkpoint"][0] == str(inside)  # the caller's table is left as it was


@pytest.mark.slow  # starts a local Ray cluster
def test_placement_groups_a_sweep_left_behind_are_found_by_job_and_removed(monkeypatch):
    """The end of wait_for_release: a placement group nothing will remove (as one a killed trial's
    Train run leaves) is found by this job's id and removed, and its CPU is free again."""
    import ray
    from ray.util.placement_group import placement_group

    from defect_tune.ray_compat import job_placement_groups

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        total = ray.cluster_resources()
        left = placement_group([{"CPU": 1}])
        ray.get(left.ready(), timeout=60)
        assert job_placement_groups(ray.get_runtime_context().get_job_id()) == [left.id.hex()]
        assert job_placement_groups("ffffffff") == []  # another job's are never touched
        free, removed = wait_for_release(total, timeout=2)
        assert removed == 1 and free["CPU"] == 2
        assert job_placement_groups(ray.get_runtime_context().get_job_id()) == []
    finally:
        ray.shutdown()


def test_tpe_proposes_once_the_starting_points_are_told_not_at_random(monkeypatch):
    """Optuna's default TPE samples its first 10 trials at random; ours only until `startup`
    trials are told. Random sampling is what TPE's start-up calls; after it, nothing does."""
    from defect_tune.search.searcher import startup_trials, tpe_sampler

    assert startup_trials(points=3, concurrent=2) == 2 and startup_trials(points=1, concurrent=2) == 1
    assert startup_trials(points=0, concurrent=2) == 4
    space = load_space(QUICK)
    study = optuna.create_study(direction="maximize", sampler=tpe_sampler(startup_trials(len(space.points), 1), seed=0))
    for _, point in space.points:
        study.enqueue_trial(point)
    random_draws = []
    real = optuna.samplers.RandomSampler.sample_independent
    monkeypatch.setattr(optuna.samplers.RandomSampler, "sample_independent",
                        lambda self, *args: random_draws.append(args[2]) or real(self, *args))
    for value in (0.4, 0.6, 0.5, 0.3):  # the points: fixed values, no sampling at all
        trial = study.ask()
        space.sample(trial)
        study.tell(trial, value)
    assert random_draws == []
    for _ in range(3):  # TPE's proposals, from the first trial after the points
        trial = study.ask()
        space.sample(trial)
        study.tell(trial, 0.5)
    assert random_draws == []


def test_no_trial_starts_that_cannot_reach_the_first_rung_before_the_budget_ends(monkeypatch):
    from ray.tune.search import Searcher

    from defect_tune.search.searcher import tpe_sampler

    clock = [1000.0]
    monkeypatch.setattr("defect_tune.search.searcher.time.time", lambda: clock[0])
    space = load_space(QUICK)
    storage = optuna.storages.InMemoryStorage()
    searcher = AshaAwareOptunaSearch(space=DefineByRun(space), metric=SELECTION, mode="max", sampler=tpe_sampler(1, 0),
                                     storage=storage, study_name="budget",
                                     max_epochs=4, grace_period=1, budget_s=100.0, startup=1,
                                     point_names=[name for name, _ in space.points],
                                     points_to_evaluate=[dict(p) for _, p in space.points])
    assert searcher.suggest("a") is not None  # no trial has reached the rung yet: nothing to judge by
    searcher.on_trial_result("a", {"epoch": 1, "time_total_s": 40.0, SELECTION: 0.5, "training_iteration": 1})
    assert searcher.rung_estimate() == 40.0
    clock[0] += 50
    assert searcher.suggest("b") is not None  # 40 s to the rung fit in the 50 s left
    clock[0] += 20
    assert searcher.suggest("c") == Searcher.FINISHED  # 30 s left: a new trial would be cut off before it
    asked = optuna.load_study(study_name="budget", storage=storage).get_trials(
        states=(optuna.trial.TrialState.RUNNING,))
    assert [t.user_attrs["proposed_by"] for t in asked] == ["transfer", "baseline"]  # the first two points, by name


def test_asha_judges_the_proposals_but_lets_the_starting_points_train_to_the_end():
    """A recipe the sweep starts from is not stopped at a rung, where a small validation set and an
    early point of its schedule make the call noisy; its values still set the bar for proposals."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from defect_tune.search.searcher import PointsFinishASHA

    scheduler = PointsFinishASHA(points=[{"model": "efficientnet_lite0", "lr": 1e-3}], time_attr="epoch",
                                 metric="score", mode="max", max_t=4, grace_period=1, reduction_factor=2)
    leader, point, weak = (SimpleNamespace(trial_id=name, config=config) for name, config in (
        ("leader", {"model": "resnet18", "lr": 3e-3}), ("point", {"model": "efficientnet_lite0", "lr": 1e-3}),
        ("weak", {"model": "efficientnet_lite0", "lr": 2e-3})))
    for trial in (leader, point, weak):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, leader, {"epoch": 1, "score": 0.9}) == TrialScheduler.CONTINUE
    # ASHA would stop it
    assert scheduler.on_trial_result(None, point, {"epoch": 1, "score": 0.1}) == TrialScheduler.CONTINUE
    # a proposal is judged
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, "score": 0.05}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, point, {"epoch": 4, "score": 0.5}) == TrialScheduler.STOP  # its last epoch
    assert (scheduler.is_point({"model": "efficientnet_lite0", "lr": 1e-3, "augment": "light"})
            and not scheduler.is_point(weak.config))


def test_train_keeps_the_checkpoint_of_the_epoch_the_leaderboard_names_in_the_objectives_direction():
    """A space ranking by its own `mode: min` objective (a loss) keeps the lowest-loss epoch's
    checkpoint, the one the leaderboard and `export` name; the built-in objective keeps the best
    selection score."""
    import dataclasses

    from defect_tune.search.trial import kept_checkpoint

    space = load_space(QUICK)
    kept = kept_checkpoint(space)
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (1, SELECTION, "max")
    by_loss = dataclasses.replace(space, objective="val_loss", mode="min")
    kept = kept_checkpoint(by_loss)
    assert (kept.checkpoint_score_attribute, kept.checkpoint_score_order) == ("val_loss", "min")
