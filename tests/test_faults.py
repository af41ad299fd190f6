"""Faults a real cluster and real configurations bring, survived by a real sweep on a local Ray
cluster: a configuration whose loss turns NaN, and a training worker killed mid-trial.

Slow (a sweep of two trials, one at a time, the killed one retried); CI runs it.
"""

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import read_csv
from test_search import read_progress, search_command

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).parent / "fault_injection"  # its sitecustomize poisons one lr's loss
NAN_LR = 0.000123
KILL_LR = 0.000456


def write_space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        "num_samples: 2\nmax_epochs: 3\nasha: {grace_period: 3, reduction_factor: 2}\n"
        "fixed: {model: el_cnn, batch_size: 64, augment: light, warmup_epochs: 0, early_stopping_patience: 0}\n"
        "params:\n  lr: {loguniform: [1.0e-4, 3.0e-3]}\n"
        "points_to_evaluate:\n"
        f"  - {{name: diverges, params: {{lr: {NAN_LR}}}}}\n"
        f"  - {{name: worker_killed, params: {{lr: {KILL_LR}}}}}\n"
    )
    return path


def _train_workers(root: int) -> list[psutil.Process]:
    """The training workers among the processes `root` started (its own local Ray cluster)."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def _progress(experiment: Path, lr: float) -> pd.DataFrame | None:
    """What Tune recorded of the trial with this lr, once it has recorded something."""
    for trial in experiment.glob("run_trial_*"):
        params = trial / "params.json"
        try:  # Tune copies the trial's files to storage while the sweep runs: one may be cut short now
            if not params.is_file() or json.loads(params.read_text()).get("lr") != pytest.approx(lr):
                continue
        except json.JSONDecodeError:
            continue
        return read_progress(trial / "progress.csv")  # this trial's table, or None until it has a whole row
    return None


def _first_epoch_reported(lines: list[str], lr: float) -> bool:
    """Whether the sweep printed the first epoch of the trial it started with this lr."""
    started = [line.split()[2] for line in lines if line.startswith("[start ") and f"lr={lr:g}" in line]
    return bool(started) and any(line.startswith("[epoch 1/") and line.split()[2] == started[0] for line in lines)


def test_a_diverging_trial_fails_with_its_reason_and_a_killed_worker_resumes_from_its_checkpoint(
        synthetic_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_LR", str(NAN_LR))
    nan_runs = tmp_path / "nan_runs.txt"
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_RUNS", str(nan_runs))
    monkeypatch.setenv("DEFECT_TUNE_TEST_SLOW_LR", str(KILL_LR))
    driver = subprocess.Popen(
        search_command("--data", synthetic_data, "--space", write_space(tmp_path), "--name", "faults", "--out", out,
                       "--max-concurrent", 1, "--max-failures", 1),
        stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True)
    reader.start()
    experiment = out / "tune" / "faults"
    killed = None
    try:
        deadline = time.monotonic() + 900
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            # The driver's own lines, not the trial's progress.csv: Tune copies that to storage
            # when it syncs, which may be after the trial's last epoch.
            if _first_epoch_reported(list(lines), KILL_LR):  # checkpointed; it sleeps through the second
                (worker,) = _train_workers(driver.pid)  # one trial at a time, one worker per trial
                worker.send_signal(signal.SIGKILL)
                killed = worker.pid
            time.sleep(0.2)
        assert killed, "the worker to kill never reported its first epoch:\n" + "".join(lines[-40:])
        assert driver.wait(timeout=900) == 0, "".join(lines[-60:])
    finally:
        if driver.poll() is None:
            driver.kill()
    reader.join(timeout=10)

    board = read_csv(out / "leaderboard.csv")
    assert len(board) == 2  # the sweep went on past both faults
    diverged = board.set_index("starting_point").loc["diverges"]
    assert diverged["status"] == "error" and diverged["stop_reason"] == "error"
    # the reason, not "trial failed"
    assert diverged["error"] == "NonFiniteLoss: epoch 1, batch 4: training loss is nan"
    # A diverged configuration is trained once: neither Train nor Tune retries it (--max-failures
    # is for crashes), and it reports its objective's worst value, so Optuna learns from it.
    assert len(nan_runs.read_text().splitlines()) == 1
    reported = _progress(experiment, NAN_LR)
    assert reported["epoch"].tolist() == [1] and reported["val_guarded_macro_recall"].tolist() == [0.0]
    recovered = board.set_index("starting_point").loc["worker_killed"]
    assert recovered["status"] == "terminated" and recovered["stop_reason"] == "completed" and recovered["epochs"] == 3
    # Retried from its last checkpoint: every epoch reported once, in order, none trained twice.
    assert _progress(experiment, KILL_LR)["epoch"].tolist() == [1, 2, 3]
    assert not psutil.pid_exists(killed)


def test_a_fold_that_diverges_ends_its_cross_validated_trial_and_stops_its_other_folds(
        synthetic_data, tmp_path, monkeypatch):
    """Under --cv a configuration whose loss turns NaN on one fold ends its trial with that fold's
    reason, trained once; the trial's other fold stops with it rather than training on beside
    the next trial, and the sweep goes on and gives every CPU back."""
    out, epochs = tmp_path / "out", 4
    space = tmp_path / "space.yaml"
    space.write_text(
        f"num_samples: 2\nmax_epochs: {epochs}\nasha: {{grace_period: {epochs}, reduction_factor: 2}}\n"
        # Batches of 32: a fold trains on about 170 images, so the poisoned 4th loss is epoch 1's 4th batch.
        "fixed: {model: el_cnn, batch_size: 32, augment: light, warmup_epochs: 0, early_stopping_patience: 0}\n"
        "params:\n  lr: {loguniform: [1.0e-4, 3.0e-3]}\n"
        f"points_to_evaluate:\n  - {{name: diverges, params: {{lr: {NAN_LR}}}}}\n"
        f"  - {{name: fine, params: {{lr: 1.0e-3}}}}\n"
    )
    nan_runs = tmp_path / "nan_runs.txt"
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_LR", str(NAN_LR))
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_FOLD", "1")
    monkeypatch.setenv("DEFECT_TUNE_TEST_NAN_RUNS", str(nan_runs))
    result = subprocess.run(
        search_command("--data", synthetic_data, "--space", space, "--name", "cvnan", "--out", out, "--cv", 2,
                       "--max-concurrent", 1, "--cpus-per-worker", 0.5, "--max-failures", 1),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    board = read_csv(out / "leaderboard.csv").set_index("starting_point")
    diverged, fine = board.loc["diverges"], board.loc["fine"]
    assert (diverged["status"] == "error"
            and diverged["error"] == "fold 1: NonFiniteLoss: epoch 1, batch 4: training loss is nan")
    assert len(nan_runs.read_text().splitlines()) == 1  # fold 1 was trained once: a divergence is not retried
    reported = _progress(out / "tune" / "cvnan", NAN_LR)
    assert reported["epoch"].tolist() == [1] and reported["val_guarded_macro_recall"].tolist() == [0.0]
    left_to_cleaner = int(reported["folds_left_to_cleaner"].iloc[0])
    assert fine["stop_reason"] == "completed" and fine["epochs"] == epochs
    # Fold 0 of the diverged trial kept its held-out predictions per epoch while it trained. It
    # stopped with its trial: on through the next trial's four epochs, it would have kept four.
    kept = sorted(p.parent.name
                  for p in (out / "tune" / "train").glob(f"cvnan-{diverged['trial_id']}-folds/epoch_*/fold0.npz"))
    assert len(kept) < epochs, kept
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["resources_free_at_end"]["CPU"] == summary["resources_total"]["CPU"]
    # The stopped fold's Train run gives its own placement group back, unless it did not stop in
    # time (a loaded machine) and the trial said so; the sweep's end removes only those.
    assert summary["placement_groups_removed_at_end"] <= left_to_cleaner
