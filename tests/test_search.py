"""Real sweeps on real local Ray clusters: ASHA without leaks (logging to W&B offline), resume after a
killed driver, a time budget, two nodes.

Slow (minutes: each trial starts a TorchTrainer, about 25 s on this CPU); CI runs them.
"""

import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from conftest import read_csv
from test_wandb import assert_key_written_nowhere, assert_one_run_per_trial, offline_env

from defect_tune.core.config import load_config

pytestmark = pytest.mark.slow


def write_space(tmp_path: Path, num_samples: int, max_epochs: int, grace: int = 1) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        f"num_samples: {num_samples}\nmax_epochs: {max_epochs}\n"
        f"asha: {{grace_period: {grace}, reduction_factor: 2}}\n"
        "fixed: {model: el_cnn, batch_size: 64, augment: light, warmup_epochs: 0, early_stopping_patience: 0}\n"
        "params:\n"
        "  loss: {choice: [bce, weighted_bce]}\n"
        "  class_weight_exponent: {uniform: [0.0, 1.0], when: {loss: weighted_bce}}\n"
        "  lr: {loguniform: [1.0e-4, 3.0e-3]}\n"
        "points_to_evaluate:\n"
        "  - {name: el_seed, params: {loss: weighted_bce, class_weight_exponent: 0.5, lr: 1.0e-3}}\n"
    )
    return path


def read_progress(path: Path) -> pd.DataFrame | None:
    """A trial's progress.csv as Tune has copied it to storage so far, or None while that copy is
    cut short (`parse_progress`)."""
    try:
        return parse_progress(path.read_bytes())
    except OSError:
        return None


def parse_progress(text: bytes) -> pd.DataFrame | None:
    """A progress.csv's bytes as a table, or None where they are cut short: Tune copies the trial's
    files to storage while the sweep runs, and a driver killed mid-copy leaves them so. Whole rows
    end in a newline; a copy cut at a row's end is a whole prefix of the trial's epochs. Parses the
    bytes checked, not the file again: Tune may be copying it."""
    if not text.endswith(b"\n") or text.count(b"\n") < 2:  # empty, cut in the header or in a row
        return None
    return read_csv(io.BytesIO(text))


def search_command(*args) -> list[str]:
    return [sys.executable, "-m", "defect_tune", "search", *map(str, args)]


def _left_behind(before: set[int], grace: float = 30.0) -> list[str]:
    """Ray or W&B processes started since `before` (pids) that are still alive after `grace` s."""
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if process.info["pid"] not in before and ("ray" in command or "wandb" in command):
                alive.append(f"{process.info['pid']}: {command[:120]}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def _pids() -> set[int]:
    return set(psutil.pids())


@pytest.mark.timeout(1500)  # 6 trials with W&B, then 1 trial x 2 folds: ~6 minutes alone on 2 cores
def assert_study_stored_and_served(out: Path, name: str, board: pd.DataFrame) -> None:
    """The sweep's Optuna study in RESULTS/optuna.db: a trial per leaderboard row, with its values
    per epoch, ASHA-stopped ones PRUNED; and optuna-dashboard serves it on loopback."""
    import socket
    import urllib.request

    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == len(board)
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted("PRUNED" if r == "asha" else "COMPLETE" for r in board["stop_reason"])
    assert sorted(len(t.intermediate_values) for t in study.trials) == sorted(board["epochs"])
    for trial in (t for t in study.trials if t.state.name == "COMPLETE"):  # told its last epoch's selection score
        assert trial.value == pytest.approx(trial.intermediate_values[max(trial.intermediate_values)])
    # TPE proposes from the first trial asked for after a trial was told: the starting point
    # first, then at most one trial asked beside it (two at a time) at random, then TPE.
    proposers = [t.user_attrs["proposed_by"] for t in sorted(study.trials, key=lambda t: t.number)]
    assert proposers[0] == "el_seed" and proposers[1] in ("random (startup)", "tpe"), proposers
    assert set(proposers[2:]) == {"tpe"}, proposers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")),
                                  f"sqlite:///{out / 'optuna.db'}",
                                  "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline and dashboard.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    answer = (response.status, json.loads(response.read()))
            except OSError:
                time.sleep(0.5)
        assert answer is not None, (dashboard.stderr.read().decode() if dashboard.poll() is not None
                                    else "no answer in 60 s")
        status, studies = answer
        assert status == 200 and [s["study_name"] for s in studies["study_summaries"]] == [name]
    finally:
        dashboard.terminate()
        dashboard.wait(30)


def test_asha_sweeps_in_a_row_complete_give_every_resource_back_and_log_every_trial_to_wandb(synthetic_data, tmp_path):
    """Six trials, so ASHA must stop some: the stopped trials' CPUs come back (a leak hangs the
    sweep), and every trial, stopped or finished, is one offline W&B run; the key is written nowhere.
    Then a cross-validated sweep right after: it completes, leaves no process behind, and Tune
    receives the fold-mean.

    Two trials at once with 1-CPU workers on 2 CPUs: the trials' workers hold every CPU, as after
    losing a node. Ray Data's tasks must still run (when they asked for a CPU, this hung forever)."""
    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        before = _pids()
        result = subprocess.run(
            search_command("--data", synthetic_data, "--space", write_space(tmp_path, 6, 3), "--name", "leak",
                           "--out", out, "--wandb", "defect-tune-test", "--max-concurrent", 2, "--cpus-per-worker", 1),
            capture_output=True, text=True, timeout=1500, env=offline_env(tmp_path, ray_tmp),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert not _left_behind(before)
        assert "leaderboard" in result.stderr and "best: trial" in result.stderr
        board = read_csv(out / "leaderboard.csv")
        assert len(board) == 6 and board["rank"].tolist() == list(range(1, 7))
        assert set(board["stop_reason"]) <= {"asha", "completed"}
        assert (board["stop_reason"] == "asha").sum() >= 1  # ASHA stopped some trials...
        assert (board["stop_reason"] == "completed").sum() >= 1  # ...and let the best run to the end
        assert board.loc[board["starting_point"] == "el_seed", "param/class_weight_exponent"].tolist() == [0.5]
        assert board["val_guarded_macro_recall"].is_monotonic_decreasing
        assert board["checkpoint"].notna().all()
        # Each objective with its bootstrap interval, each class's recall with its counts and Wilson interval.
        objective = board["val_guarded_macro_recall"]
        assert ((board["val_guarded_macro_recall_low"] <= objective).all()
                and (objective <= board["val_guarded_macro_recall_high"]).all())
        for c in json.loads((synthetic_data / "meta.json").read_text())["classes"]:
            scored = board[board[f"val_positives/{c}"] > 0]
            assert (scored[f"val_recall/{c}"] == scored[f"val_recalled/{c}"] / scored[f"val_positives/{c}"]).all()
            assert (scored[f"val_recall_low/{c}"] <= scored[f"val_recall/{c}"]).all()
            assert (scored[f"val_recall/{c}"] <= scored[f"val_recall_high/{c}"]).all()
        # Where each trial's start-up went, reported with its epochs (benchmarks/bench_sweep.py).
        assert (board["startup_seconds"] > 0).all() and (board["startup_seconds"] < board["wall_seconds"]).all()
        for progress in (out / "tune" / "leak").glob("run_trial_*/progress.csv"):
            history = read_csv(progress)
            assert (history[["startup/datasets_s", "startup/trainer_s", "startup/model_s", "startup/first_batch_s",
                             "epoch_s"]] > 0).all().all()
            assert (history["timestamp_s"] > history["trial_started_s"]).all()
            # The parts follow one another from the trial's start to its first batch, before its
            # first report: together no longer than that (a part counted twice would be).
            first = history.sort_values("epoch").iloc[0]
            assert (first[[c for c in history if c.startswith("startup/")]].sum()
                    < first["timestamp_s"] - first["trial_started_s"])
        summary = json.loads((out / "sweep.json").read_text())
        total, free = summary["resources_total"], summary["resources_free_at_end"]
        assert free["CPU"] == total["CPU"]  # no CPU held by a stopped trial's placement group
        best = load_config(out / "best_config.yaml")
        assert best.epochs == 3 and best.model == "el_cnn"
        assert pd.read_parquet(out / "leaderboard.parquet")["trial_id"].tolist() == board["trial_id"].tolist()
        # What each configuration costs: measured once per trial on its device, memory every epoch.
        assert (board["cost/params"] > 0).all() and (board["cost/gflops_per_image"] > 0).all()
        assert ((board["cost/latency_ms_b1"] > 0) & (board["cost/latency_ms_b32"] > 0)
                & (board["cost/peak_memory_mb"] > 0)).all()
        assert board.groupby("param/loss")["cost/params"].nunique().max() == 1  # one backbone (el_cnn): one size
        assert_study_stored_and_served(out, "leak", board)

        assert f"runs go to {out / 'wandb'}" in result.stderr and "wandb sync" in result.stderr
        assert_one_run_per_trial(out, "leak", "defect-tune-test", synthetic_data)
        assert_key_written_nowhere(result, out, ray_tmp, tmp_path)
        # The local cluster search started got raytrain.cluster.LOCAL_CLUSTER_ENV: no preemption watcher per
        # trial. (Ray writes each actor's class into its worker's log: the controllers are there.)
        actors = [line for log in ray_tmp.glob("ray/session_2*/logs/worker-*.out")
                  for line in log.read_text(errors="replace").splitlines() if line.startswith(":actor_name:")]
        assert ":actor_name:TrainController" in actors and ":actor_name:PreemptionWatcher" not in actors
        # Ray Data's stats actor, started by the driver, served all six trials (created in a trial,
        # it died with each and was started again).
        assert actors.count(":actor_name:TrainController") >= 6 and actors.count(":actor_name:_StatsActor") == 1
        # One report relay for the sweep, not a queue actor per trial: the queue actors left are
        # W&B's, one beside each trial's W&B logging actor.
        assert actors.count(":actor_name:ReportRelay") == 1
        assert actors.count(":actor_name:_QueueActor") == actors.count(":actor_name:_TrialRun") == 6

        # The results folder moves whole: report (with the best trial's precision-recall curves,
        # read from its checkpoint under tune/) and export work from the new place, the old gone.
        moved = tmp_path / "elsewhere" / "leak-results"
        moved.parent.mkdir()
        shutil.move(out, moved)
        assert not board["checkpoint"].str.startswith("/").any()  # kept relative to the folder
        exported = subprocess.run([sys.executable, "-m", "defect_tune", "export", str(moved),
                                   "--out", str(tmp_path / "moved.yaml")],
                                  capture_output=True, text=True, timeout=300)
        assert exported.returncode == 0, exported.stderr[-3000:]
        handed = yaml.safe_load((tmp_path / "moved.yaml").read_text())["sweep"]
        assert Path(handed["checkpoint"]).is_dir() and Path(handed["checkpoint"]).is_relative_to(moved)
        assert Path(handed["space"]) == moved / "space.yaml"
        # Even without the Tune experiment (as the folder is committed), the report has every
        # figure: the best trial's validation predictions were copied into the folder.
        shutil.rmtree(moved / "tune")
        kept = json.loads((moved / "sweep.json").read_text())["best_predictions"]
        assert kept["trial_id"] == board["trial_id"][0] and (moved / kept["files"][0]).is_file()
        reported = subprocess.run([sys.executable, "-m", "defect_tune", "report", str(moved)],
                                  capture_output=True, text=True, timeout=600)
        assert reported.returncode == 0, reported.stderr[-3000:]
        page = (moved / "report" / "report.html").read_text()
        assert "No precision-recall curves" not in page and (moved / "report" / "precision_recall.png").is_file()
        # the space was found (a copy in the folder)
        assert "could not be drawn" not in page and "Values of" not in page

        # Another sweep right after, cross-validated: two TorchTrainers per trial, side by side.
        (tmp_path / "again").mkdir()
        before = _pids()
        again = subprocess.run(
            search_command("--data", synthetic_data, "--space", write_space(tmp_path / "again", 1, 2),
                           "--name", "again", "--out", tmp_path / "again", "--max-concurrent", 1,
                           "--cpus-per-worker", 0.5, "--cv", 2),
            capture_output=True, text=True, timeout=600, env=offline_env(tmp_path, ray_tmp),
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert not _left_behind(before)
        board = read_csv(tmp_path / "again" / "leaderboard.csv")
        assert len(board) == 1 and board["stop_reason"].tolist() == ["completed"]
        summary = json.loads((tmp_path / "again" / "sweep.json").read_text())
        assert summary["resources_free_at_end"]["CPU"] == summary["resources_total"]["CPU"]
        assert summary["worker"] == {"per_trial": 1, "cpus": 0.5, "gpus": 0.0} and summary["gpu_memory"] is None
        assert "each on 2 folds of train+val" in again.stderr
        assert_tune_received_the_fold_mean(tmp_path / "again", "again", synthetic_data, folds=2)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def assert_tune_received_the_fold_mean(out: Path, name: str, data: Path, folds: int) -> None:
    """Every epoch Tune saw is the mean of the folds' objectives, and the last one equals the
    objective recomputed from each fold's own held-out predictions (its Train checkpoint)."""
    import numpy as np

    from defect_tune.core.config import OBJECTIVE, TrainConfig
    from defect_tune.training.engine import score_epoch

    meta = json.loads((data / "meta.json").read_text())
    assert json.loads((out / "sweep.json").read_text())["cv"] == {"folds": folds, "seed": 0}
    configs = json.loads((out / "trial_configs.json").read_text())
    progresses = sorted((out / "tune" / name).glob("run_trial_*/progress.csv"))
    assert progresses and len(progresses) == len(configs)  # every trial of the sweep
    for progress in progresses:
        history = read_csv(progress)
        assert (history["folds"] == folds).all()
        per_fold = history[[f"{OBJECTIVE}/fold{f}" for f in range(folds)]]
        assert np.allclose(history[OBJECTIVE], per_fold.mean(axis=1))
        assert (history[f"{OBJECTIVE}_low"] <= history[OBJECTIVE]).all()
        trial_id = str(history["trial_id"].iloc[-1])
        config = TrainConfig.model_validate(configs[trial_id])
        assert all(f"{name}-{trial_id}-fold{fold}" in checkpoint  # each fold its own TorchTrainer run
                   for fold, checkpoint in enumerate(json.loads(history["fold_checkpoints"].iloc[-1])))
        for _, row in history.iterrows():  # every epoch's held-out predictions are kept, whatever Train deletes
            recomputed, held_out = [], 0
            for fold, file in enumerate(json.loads(row["fold_predictions"])):
                assert file.endswith(f"epoch_{int(row['epoch']):03d}/fold{fold}.npz")
                saved = np.load(file)
                recomputed.append(score_epoch(saved["probs"], saved["targets"], config, meta["classes"])[OBJECTIVE])
                held_out += len(saved["targets"])
            assert row[OBJECTIVE] == pytest.approx(np.mean(recomputed))
            assert held_out == meta["splits"]["train"]["images"] + meta["splits"]["val"]["images"]
    # The export says the thresholds are fold-means (retrain then uses all of train+val), and the
    # report's precision-recall curves come from every fold's held-out predictions.
    from defect_tune.production.export import build_export
    from defect_tune.report.page import write_report

    assert build_export(out)["cv"] == {"folds": folds, "seed": 0}
    html = write_report(out)
    assert (html.parent / "precision_recall.png").is_file() and "No precision-recall curves" not in html.read_text()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_resume_after_the_driver_is_killed_keeps_finished_trials(synthetic_data, tmp_path):
    out = tmp_path / "out"
    # Two trials at once, grace = max: no ASHA stops. The driver is killed once one has finished,
    # while the other is training; the resumed sweep keeps the first and completes the second.
    # The space allows 3 epochs; the sweep starts with epochs=2 on the command line, and the
    # resumed one, given no override, keeps it.
    space = write_space(tmp_path, 2, 3, grace=2)
    args = ("--data", synthetic_data, "--space", space, "--name", "resumable", "--out", out)
    driver = subprocess.Popen(search_command(*args, "epochs=2", "batch_size=32"), stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True)
    reader.start()
    experiment = out / "tune" / "resumable"

    def finished_on_disk() -> bool:  # a trial's two epochs in the storage folder, not only announced
        return any((table := parse_progress(p.read_bytes())) is not None and len(table) == 2
                   for p in experiment.glob("run_trial_*/progress.csv"))

    deadline = time.monotonic() + 600
    while not (any(line.startswith("[done]") for line in lines) and finished_on_disk()) and time.monotonic() < deadline:
        time.sleep(1)
    assert any(line.startswith("[done]") for line in lines), "no trial finished before the deadline"
    # Kill the driver and everything it started (its local Ray cluster), by the ids it started.
    processes = _descendants(driver.pid)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:  # exited by itself since it was listed
            pass
    psutil.wait_procs(processes, timeout=30)

    finished = {}
    for trial_dir in experiment.glob("run_trial_*"):
        progress = trial_dir / "progress.csv"
        text = progress.read_bytes() if progress.is_file() else b""
        table = parse_progress(text)
        if table is not None and len(table) == 2:
            finished[trial_dir.name] = text  # the bytes that were parsed: compared after the resume
    assert finished, "the killed sweep left no finished trial on disk:\n" + "".join(lines[-40:])

    resumed = subprocess.run(search_command(*args, "--resume"), capture_output=True, text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    board = read_csv(out / "leaderboard.csv")
    assert len(board) == 2 and (board["epochs"] == 2).all()
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["overrides"] == {"epochs": 2, "batch_size": 32} and summary["fixed"]["batch_size"] == 32
    assert summary["max_epochs"] == 2
    for name, before in finished.items():  # finished trials were kept, not rerun
        assert (experiment / name / "progress.csv").read_bytes() == before


@pytest.mark.timeout(600)  # about 90 s alone on 2 cores: a 60 s budget, Ray's start and stop
def test_a_time_budget_ends_the_sweep_and_keeps_every_trial(synthetic_data, tmp_path):
    """Without --num-samples, trials start until the budget runs out: more than the space's 2, and
    only the budget can end such a sweep (how long that takes on a busy machine is not asserted). ASHA's
    grace is the 2 epochs, so a trial runs both or the budget cuts it off: the first two (two at a
    time) finish within it, later ones are cut off and keep what they reported."""
    out = tmp_path / "out"
    budget = 90  # the first two trials' start-up and 2 epochs, with room for a loaded 2-core machine
    result = subprocess.run(
        search_command("--data", synthetic_data, "--space", write_space(tmp_path, 2, 2, grace=2), "--name", "budget",
                       "--out", out, "--time-budget", "90s"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "until its time budget of 1m30s runs out" in result.stderr and "best: trial" in result.stderr

    board = read_csv(out / "leaderboard.csv").set_index("trial_id", drop=False)
    experiment = out / "tune" / "budget"
    assert len(board) == len(list(experiment.glob("run_trial_*"))) > 2  # every trial Tune started is kept
    reasons = board["stop_reason"]
    assert set(reasons) == {"completed", "time_budget"}
    assert ((board.loc[reasons == "completed", "epochs"] == 2).all()
            and (board.loc[reasons == "time_budget", "epochs"] < 2).all())
    for trial_dir in experiment.glob("run_trial_*"):  # a trial cut off keeps the epochs it reported
        history = read_progress(trial_dir / "progress.csv")
        trial_id = trial_dir.name.split("_")[2]
        assert board.loc[trial_id, "epochs"] == (0 if history is None else history["epoch"].max())
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["num_samples"] is None and summary["time_budget"]["seconds"] == budget
    assert summary["time_budget"]["cut_off"] == sorted(board.loc[reasons == "time_budget", "trial_id"])
    assert summary["stop_reasons"] == reasons.value_counts().to_dict()
    # cut-off trials' placement groups are given back (wait_for_release)
    assert summary["resources_free_at_end"]["CPU"] == summary["resources_total"]["CPU"]
    assert load_config(out / "best_config.yaml").epochs == 2


def test_a_run_resumed_after_its_last_checkpoint_reports_that_epoch_again(synthetic_data, tmp_path, request,
                                                                          monkeypatch):
    """A resumed trial whose Train run had checkpointed its last epoch before the driver died (Tune
    never recorded it; seen in CI) reports that epoch again instead of ending without a result.

    The run has two workers (DDP, the train split across them), and each keeps its part of the
    train shard in memory: Ray Data reads every shard once in the 3 epochs (a streamed run reads
    the train shards every epoch), and the resumed run reads nothing.

    Then a run of the same two workers whose rank 1 alone sees its loss turn NaN (fault injection):
    both workers end together after that epoch, which is reported once as diverged, and the run
    ends without an error (so neither Train nor Tune retries it)."""
    import ray
    from ray.util.state import list_tasks

    from defect_tune.core.config import OBJECTIVE, TrainConfig
    from defect_tune.data.shards import read_meta
    from defect_tune.search.report_relay import start_report_relay
    from defect_tune.search.trial import QueueReportCallback, TrialSetup, _trainer

    config = TrainConfig(model="el_cnn", epochs=3, batch_size=64, augment="light", warmup_epochs=0, pretrained=False)
    setup = TrialSetup(data_dir=str(synthetic_data), meta=read_meta(synthetic_data), space=None,
                       storage_path=str(tmp_path / "tune"), sweep_name="again", workers_per_trial=2,
                       cpus_per_worker=0.5, keep_train_bytes=2**30)
    from test_faults import FAULTS  # Ray's processes inherit this environment at ray.init

    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_LR", "0.000123")
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_RANK", "1")
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_RUNS", str(tmp_path / "nan_runs.txt"))
    ray.init(num_cpus=2, include_dashboard=True, configure_logging=False)  # the State API lists the tasks
    request.addfinalizer(ray.shutdown)

    reports = start_report_relay()

    def fit(config: TrainConfig = config, setup: TrialSetup = setup, name: str = "again-t1") -> list[dict]:
        """One fit of the trial's Train run, and what it reported (as a trial would hand it on)."""
        callback = QueueReportCallback(0, reports, name)
        _trainer(config, setup, setup.meta, name, time.time(), [callback]).fit()
        return [row for _, row in ray.get(reports.take.remote(name, 0))]  # all there once fit() has returned

    def shard_reads() -> int:
        return sum(task.name.startswith("ReadParquet")
                   for task in list_tasks(limit=10_000, raise_on_missing_output=False))

    first = fit()
    assert [row["epoch"] for row in first] == [1, 2, 3] and all(0 <= row[OBJECTIVE] <= 1 for row in first)
    shards = {shard["file"] for split in ("train", "val") for shard in setup.meta["splits"][split]["shards"]}
    assert shard_reads() == len(shards)  # one read task per shard file; a streamed run reads train's 3 times
    resumed = fit()  # the same Train run again: it restores from its checkpoint after epoch 3 of 3
    assert len(resumed) == 1 and resumed[0]["epoch"] == first[-1]["epoch"] == 3
    assert (resumed[0][OBJECTIVE] == first[-1][OBJECTIVE]
            and resumed[0]["checkpoint_path"] != first[-1]["checkpoint_path"])
    assert shard_reads() == len(shards)

    # 140 training images per worker: 2 batches of 64 an epoch, so rank 1's 4th batch is epoch 2's last.
    from defect_tune.search.space import load_space

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml")
    diverging = config.model_copy(update={"lr": 0.000123})
    rows = fit(diverging, TrialSetup(**{**setup.__dict__, "space": space}), "again-nan")
    assert [row["epoch"] for row in rows] == [1, 2] and "diverged" not in rows[0]
    assert rows[1]["diverged"] == "NonFiniteLoss: epoch 2, batch 2: training loss is nan" and rows[1][OBJECTIVE] == 0.0
    assert len((tmp_path / "nan_runs.txt").read_text().splitlines()) == 1  # rank 1's loss, built once: no retry


def test_two_node_cluster_runs_trials_on_both_nodes_and_survives_losing_one(synthetic_data, tmp_path):
    """A sweep on a head and a worker node; the worker node is stopped while a trial trains on it.
    With --max-failures, that trial starts again from its last checkpoint on the surviving node."""
    from ray.cluster_utils import Cluster

    # 2 + 2 CPUs, one CPU per worker: three trials at once (a CPU left unreserved) cannot all fit
    # on one node, so the sweep must use both. Once the worker node is gone they are three trials
    # on the head's 2 CPUs.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    driver = None
    try:
        worker = cluster.add_node(num_cpus=2, resources={"worker2": 1})
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        driver = subprocess.Popen(
            search_command("--data", synthetic_data, "--space", write_space(tmp_path, 3, 2, grace=2),
                           "--name", "two-nodes", "--out", out, "--storage", tmp_path / "shared",
                           "--address", cluster.address, "--cpus-per-worker", 1, "--max-failures", 2),
            stderr=subprocess.PIPE, text=True,
        )
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True).start()
        experiment, lost = tmp_path / "shared" / "two-nodes", None
        deadline = time.monotonic() + 300  # these waits end before pytest's 900 s, so a hang shows the log
        while lost is None and driver.poll() is None and time.monotonic() < deadline:
            for progress in experiment.glob("run_trial_*/progress.csv"):
                table = read_progress(progress)
                # mid-trial on the worker
                if table is not None and len(table) == 1 and table["node_id"].iloc[0] == worker.node_id:
                    lost = progress.parent.name
                    cluster.remove_node(worker)  # the node's raylet and every process on it, at once
                    break
            time.sleep(0.5)
        assert lost, "no trial reported an epoch from the worker node:\n" + "".join(lines[-40:])
        try:
            driver.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep did not finish within 7 min of losing the node:\n" + "".join(lines[-60:]))
        assert driver.returncode == 0, "".join(lines[-60:])

        board = read_csv(out / "leaderboard.csv")
        assert len(board) == 3 and board["stop_reason"].eq("completed").all() and board["epochs"].eq(2).all()
        nodes = set(",".join(board["nodes"].dropna()).split(","))
        assert worker.node_id in nodes and len(nodes) == 2  # trials trained on the head and on the worker
        moved = read_csv(experiment / lost / "progress.csv")
        assert moved["epoch"].tolist() == [1, 2]  # continued from its checkpoint, nothing trained twice
        assert moved["node_id"].iloc[-1] != worker.node_id  # and finished on the surviving node
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.shutdown()


def test_a_multi_objective_sweep_trades_its_objective_against_latency_over_two_backbones(synthetic_data, tmp_path):
    """`trade_offs: [cost/latency_ms_b1]`: Optuna's study has two directions and is told each
    trial's objective and measured latency; the report draws that front over a small and a large
    backbone, and export picks within a latency limit."""
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text(
        "num_samples: 3\nmax_epochs: 1\nasha: {grace_period: 1, reduction_factor: 2}\n"
        "fixed: {batch_size: 64, augment: light, warmup_epochs: 0, early_stopping_patience: 0}\n"
        "params:\n  model: {choice: [el_cnn, resnet18]}\n  lr: {loguniform: [3.0e-4, 3.0e-3]}\n"
        "trade_offs: [cost/latency_ms_b1]\n"
        "points_to_evaluate:\n  - {name: small, params: {model: el_cnn, lr: 1.0e-3}}\n"
        "  - {name: large, params: {model: resnet18, lr: 1.0e-3}}\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(search_command("--data", synthetic_data, "--space", space, "--name", "pareto",
                                           "--out", out),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # The sweep's own lines, without the start-up notices nobody acts on (ray_compat.quiet_start_notices).
    for notice in ("Token authentication is enabled", "Configuration for experiment", "tensorboard",
                   "A new study created"):
        assert notice not in result.stderr + result.stdout
    assert "[done]" in result.stderr and "next: defect-tune report" in result.stderr
    board = read_csv(out / "leaderboard.csv").set_index("trial_id", drop=False)
    sizes = board.groupby("param/model")["cost/params"].max()
    assert sizes["resnet18"] > 10 * sizes["el_cnn"]  # two backbones of different size, measured
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    told = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(told) == len(board) == 3
    latencies = sorted(board["cost/latency_ms_b1"])
    assert sorted(t.values[1] for t in told) == pytest.approx(latencies)  # the searcher saw what the leaderboard shows
    assert json.loads((out / "sweep.json").read_text())["trade_offs"] == ["cost/latency_ms_b1"]

    reported = subprocess.run([sys.executable, "-m", "defect_tune", "report", str(out)],
                              capture_output=True, text=True, timeout=600)
    assert reported.returncode == 0, reported.stderr[-3000:]
    page = (out / "report" / "report.html").read_text()
    assert ("<h2>Objective against cost</h2>" in page
            and "on the front against milliseconds per image at batch 1" in page)
    fastest = board.sort_values("cost/latency_ms_b1").iloc[0]
    limit = float(fastest["cost/latency_ms_b1"]) * 1.0001
    exported = subprocess.run([sys.executable, "-m", "defect_tune", "export", str(out),
                               "--out", str(tmp_path / "fast.yaml"), "--max-latency-ms", str(limit)],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    chosen = yaml.safe_load((tmp_path / "fast.yaml").read_text())["sweep"]
    assert chosen["cost"]["latency_ms_b1"] <= limit and chosen["limits"] == {"cost/latency_ms_b1": limit}
