"""`search --wandb`: one W&B run per trial, read back from the offline run files W&B itself writes.

These run W&B offline in this process, without Ray. The real sweep's runs are checked by
test_search.py's ASHA sweep, which logs to W&B through the helpers at the end of this file.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_csv
from rich.console import Console

from defect_tune.search.leaderboard import stop_reason
from defect_tune.search.space import load_space
from defect_tune.search.tracking import FINAL, SweepRuns, TrackingError, _TrialRun, wandb_callbacks, wandb_mode

# A key in W&B's format (40+ word characters) that must never reach a file or the output.
SECRET = "dtsecret_" + "k3y" * 14

CLASSES = ["crack", "finger"]
META = {
    "classes": CLASSES, "source_fingerprint": "abc123",
    "splits": {"train": {"positives": {"crack": 30, "finger": 3}}, "val": {"positives": {"crack": 6, "finger": 1}}},
}


# --- reading offline runs ---------------------------------------------------------------------
# A `run-*.wandb` file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then
# LevelDB-log records in 32 KiB blocks (crc32, length, type: full/first/middle/last), each record a
# serialized `wandb.proto.wandb_internal_pb2.Record`. This is the file `wandb sync` uploads.

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, parts, pos = [], [], HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding up to the end of a block (or of the file)
            pos += left
            continue
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    return records


def _items(items) -> dict:
    """Key/value items to a dict; a nested key (a logged table's fields) to nested dicts."""
    out: dict = {}
    for item in items:
        *parents, key = item.nested_key or [item.key]
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = json.loads(item.value_json)
    return out


def read_run(run_dir: Path) -> dict:
    """An offline run: its run record's identity, config, history rows and final summary."""
    (log,) = run_dir.glob("run-*.wandb")
    run, config, history, summary = None, {}, [], {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    assert run is not None, f"no run record in {log}"
    config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
    return {"id": run.run_id, "name": run.display_name, "group": run.run_group, "job_type": run.job_type,
            "project": run.project, "tags": list(run.tags), "config": config, "history": history,
            "summary": summary, "dir": run_dir}


# --- without Ray ------------------------------------------------------------------------------

def test_mode_explicit_wins_then_key_then_stored_login_else_offline():
    never = lambda: False  # noqa: E731
    assert wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": SECRET}, never) == "disabled"
    assert wandb_mode({"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET}, never) == "offline"
    assert wandb_mode({"WANDB_API_KEY": SECRET}, never) == "online"
    assert wandb_mode({}, lambda: True) == "online"
    assert wandb_mode({}, never) == "offline"


def test_stop_reason_follows_the_leaderboard_rule():
    assert stop_reason(3, 3, early_stopped=False, failed=False) == "completed"
    assert stop_reason(2, 3, early_stopped=True, failed=False) == "early_stopping"
    assert stop_reason(1, 3, early_stopped=False, failed=False) == "asha"
    assert stop_reason(1, 3, early_stopped=False, failed=True) == "error"
    assert stop_reason(0, 3, early_stopped=False, failed=False) == "no_result"


def test_without_wandb_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml")
    with pytest.raises(TrackingError, match="needs the wandb package"):
        wandb_callbacks("proj", "sweep", tmp_path, space, META, Console(quiet=True))
    assert wandb_callbacks(None, "sweep", tmp_path, space, META, Console()) == []


def test_online_without_a_key_is_refused_before_the_sweep(monkeypatch, tmp_path):
    monkeypatch.setattr("defect_tune.search.tracking._stored_login", lambda: False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml")
    with pytest.raises(TrackingError, match="no W&B API key"):
        wandb_callbacks("proj", "sweep", tmp_path, space, META, Console(quiet=True))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    console = Console(record=True, width=400)
    (callback,) = wandb_callbacks("proj", "sweep", tmp_path / "out", space, META, console)
    assert callback.kwargs["mode"] == "offline" and callback.kwargs["dir"] == str(tmp_path / "out")
    assert f"wandb sync {tmp_path / 'out' / 'wandb'}/offline-run-*" in console.export_text()


def _epoch(epoch: int, objective: float, early_stopped: bool = False) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "val_guarded_macro_recall": objective,
            "early_stopped": early_stopped, "val_recall/crack": objective + 0.1, "val_recall/finger": objective - 0.1,
            "threshold/crack": 0.3 + epoch / 10, "threshold/finger": 0.2 + epoch / 10, "node_id": "n1",
            "config": {"lr": 0.01}}


class _Queue:
    def __init__(self, items):
        self.items = list(items)

    def get(self):
        return self.items.pop(0)


def test_a_diverged_trial_run_ends_failed_with_its_reason_and_its_best_epoch_before(tmp_path):
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml")
    callback = SweepRuns("proj", "sweep-1", space, META, str(tmp_path), "offline")
    callback.note("t_00002", _epoch(1, 0.5))
    callback.note("t_00002", {"epoch": 2, "val_guarded_macro_recall": 0.0,
                              "diverged": "NonFiniteLoss: epoch 2, batch 1: training loss is nan"})
    summary = callback.final("t_00002", failed=False)["summary"]  # Tune saw the trial end, not fail
    assert summary == {"stop_reason": "error", "epochs": 2, "best_epoch": 1, "val_guarded_macro_recall": 0.5,
                       "error": "NonFiniteLoss: epoch 2, batch 1: training loss is nan"}


def test_a_trial_run_has_epoch_axis_best_summary_and_per_class_table(tmp_path, monkeypatch):
    """Ray's logging actor, run in this process (no Ray) on the items the callback queues."""
    from ray.air.integrations.wandb import _QueueItem

    monkeypatch.chdir(tmp_path)  # the actor changes directory to the trial's folder
    monkeypatch.setenv("WANDB_START_METHOD", "thread")
    monkeypatch.setenv("WANDB_MODE", "offline")
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml")
    callback = SweepRuns("proj", "sweep-1", space, META, str(tmp_path), "offline")
    results = [_epoch(1, 0.5), _epoch(2, 0.7), _epoch(3, 0.6, early_stopped=True)]
    for result in results:
        callback.note("t_00001", result)
    final = callback.final("t_00001", failed=False)
    assert final["summary"] == {"stop_reason": "completed" if space.max_epochs <= 3 else "early_stopping",
                                "epochs": 3, "best_epoch": 2, "val_guarded_macro_recall": 0.7}
    queue = _Queue([*((_QueueItem.RESULT, r) for r in results), (_QueueItem.RESULT, {FINAL: final}),
                    (_QueueItem.END, None)])
    (tmp_path / "trial").mkdir()
    actor = _TrialRun(logdir=str(tmp_path / "trial"), queue=queue, exclude=["config", "done"], to_config=["node_id"],
                      id="t_00001", name="t_00001", project="proj", group="sweep-1", job_type="trial",
                      tags=["defect-tune"], dir=str(tmp_path), mode="offline", config={"lr": 0.01, "sweep": "sweep-1"})
    actor.run()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert (run["id"], run["name"], run["group"], run["job_type"]) == ("t_00001", "t_00001", "sweep-1", "trial")
    assert run["config"]["lr"] == 0.01 and run["config"]["node_id"] == "n1"
    epochs = [row for row in run["history"] if "val_guarded_macro_recall" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert [row["val_guarded_macro_recall"] for row in epochs] == [0.5, 0.7, 0.6]
    assert all("training_iteration" not in row for row in run["history"])
    (table_row,) = [row for row in run["history"] if "per_class" in row]
    assert table_row["epoch"] == 3  # the table lands on the last epoch
    table = json.loads((run_dir / "files" / table_row["per_class"]["path"]).read_text())
    assert table["columns"] == ["class", "train_positives", "val_positives", "val_recall", "threshold"]
    assert table["data"] == [["crack", 30, 6, pytest.approx(0.8), pytest.approx(0.5)],
                             ["finger", 3, 1, pytest.approx(0.6), pytest.approx(0.4)]]
    assert run["summary"]["val_guarded_macro_recall"] == 0.7 and run["summary"]["best_epoch"] == 2


# --- a real sweep's runs (the sweep itself is test_search.py's ASHA sweep) -----------------------

def assert_one_run_per_trial(out: Path, sweep: str, project: str, data: Path) -> None:
    """Every trial of the sweep in `out` is one offline run whose history, summary and per-class
    table match what Tune and the leaderboard recorded."""
    board = pd.read_parquet(out / "leaderboard.parquet")
    runs = {run["id"]: run for run in map(read_run, sorted((out / "wandb").glob("offline-run-*")))}
    assert sorted(runs) == sorted(board["trial_id"])  # one run per trial
    classes = json.loads((data / "meta.json").read_text())["classes"]
    for _, row in board.iterrows():
        run = runs[row["trial_id"]]
        assert (run["name"], run["group"], run["job_type"], run["project"]) == (
            row["trial_id"], sweep, "trial", project)
        assert run["tags"] == ["defect-tune", "space"]
        sampled = {k.removeprefix("param/"): v for k, v in row.items() if k.startswith("param/") and pd.notna(v)}
        assert {k: run["config"][k] for k in sampled} == pytest.approx(sampled)
        assert run["config"]["sweep"] == sweep and run["config"]["data_fingerprint"]
        assert run["config"]["starting_point"] == (row["starting_point"] if pd.notna(row["starting_point"]) else None)
        # Every epoch Tune recorded, in order, with our epoch as the x axis.
        (progress,) = (out / "tune" / sweep).glob(f"run_trial_{row['trial_id']}*/progress.csv")
        tune_history = read_csv(progress)
        epochs = [h for h in run["history"] if "val_guarded_macro_recall" in h]
        assert [h["epoch"] for h in epochs] == tune_history["epoch"].tolist() == list(range(1, row["epochs"] + 1))
        assert [h["val_guarded_macro_recall"] for h in epochs] == pytest.approx(
            tune_history["val_guarded_macro_recall"].tolist())
        assert max(h["val_guarded_macro_recall"] for h in epochs) == pytest.approx(row["val_guarded_macro_recall"])
        summary = run["summary"]
        assert summary["stop_reason"] == row["stop_reason"] and summary["epochs"] == row["epochs"]
        assert summary["best_epoch"] == row["best_epoch"]
        assert summary["val_guarded_macro_recall"] == pytest.approx(row["val_guarded_macro_recall"])
        (table_row,) = [h for h in run["history"] if "per_class" in h]
        table = json.loads((run["dir"] / "files" / table_row["per_class"]["path"]).read_text())
        assert [r[0] for r in table["data"]] == classes
        assert [r[3] for r in table["data"]] == pytest.approx([row[f"val_recall/{r[0]}"] for r in table["data"]])


def assert_key_written_nowhere(result: subprocess.CompletedProcess, *roots: Path) -> None:
    secret = SECRET.encode()
    assert secret not in result.stdout.encode() + result.stderr.encode()
    for root in roots:
        leaks = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]
        assert not leaks, f"the API key was written to {leaks}"


def offline_env(tmp_path: Path, ray_tmp: Path) -> dict:
    """A user's environment with a W&B key but offline, W&B's folders and Ray's temp dir in the test's own."""
    env = {**os.environ, "WANDB_API_KEY": SECRET, "WANDB_MODE": "offline", "RAY_TMPDIR": str(ray_tmp),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    env.pop("WANDB_DIR", None)
    return env
