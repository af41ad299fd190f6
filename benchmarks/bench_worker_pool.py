"""What keeping idle Ray worker processes longer saves a sweep: Ray's default (an idle worker
beyond the node's soft limit is killed after 1 s) against the 60 s that `search` gives a local
cluster, side by side in one run.

    python benchmarks/bench_worker_pool.py [--data DIR] [--trials 4] [--epochs 2] [--repeats 2]
                                           [--write results/benchmarks/worker_pool.md]

Each setting runs the same `defect-tune search` (el_cnn, no augmentation, one trial at a time
with a 1-CPU worker, ASHA's grace period equal to the epochs so that both train every trial to
the end, Optuna seeded alike) on its own local Ray cluster, with
RAY_idle_worker_killing_time_threshold_ms set for it. A thread samples every process the search
started (its Ray cluster) every 0.5 s. Printed per setting: the sweep's seconds (`sweep.json`),
the trials' start-up parts (median), how many processes Ray started and how much CPU they used,
the peak memory of all of them together and of the idle ones; then the ratios. The settings
alternate, `--repeats` times each (runs on a shared machine vary by 10-15 %): the table shows
every run's figure and the ratio of the means.

Default data: the embedded synthetic set at 64 px (generated into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from common import data_or_synthetic, each, emit, machine, sampled_search

SETTINGS = {"1000": "Ray's default, 1 s", "60000": "60 s (what `search` sets)"}
STARTUP = ("startup/datasets_s", "startup/trainer_s", "startup/model_s", "startup/first_batch_s")


def one_sweep(data: Path, trials: int, epochs: int, scratch: Path, threshold: str, run: int) -> dict:
    space = scratch / "space.yaml"
    space.write_text(yaml.safe_dump({
        "num_samples": trials, "max_epochs": epochs, "asha": {"grace_period": epochs, "reduction_factor": 2},
        "fixed": {"model": "el_cnn", "batch_size": 64, "augment": "none", "warmup_epochs": 0,
                  "early_stopping_patience": 0},
        "params": {"loss": {"choice": ["bce", "weighted_bce"]}, "lr": {"loguniform": [3e-4, 3e-3]}},
    }, sort_keys=False))
    out = scratch / f"sweep-{threshold}-{run}"
    env = {**os.environ, "RAY_idle_worker_killing_time_threshold_ms": threshold}
    sampler = sampled_search(data, space, out, "pool", scratch / f"search-{threshold}-{run}.log",
                             ["--cpus-per-worker", "1"], env)
    rows = pd.concat(pd.read_csv(p) for p in (out / "tune" / "pool").glob("run_trial_*/progress.csv"))
    first = rows.sort_values("epoch").groupby("trial_id").first()
    return {
        "seconds": json.loads((out / "sweep.json").read_text())["seconds"],
        "trial_epochs": len(rows),
        **{key: statistics.median(first[key]) for key in STARTUP},
        "later_epoch": (statistics.median(rows.loc[rows["epoch"] > 1, "epoch_s"]) if (rows["epoch"] > 1).any()
                        else float("nan")),
        "processes": len(sampler.cpu),
        "cpu": sum(sampler.cpu.values()),
        "peak_rss_gb": sampler.peak_rss / 2**30,
        "peak_idle": sampler.peak_idle,
        "peak_idle_rss_gb": sampler.peak_idle_rss / 2**30,
    }


def ratio(old: list[dict], new: list[dict], key: str) -> str:
    before = statistics.fmean(run[key] for run in old)
    return f"{statistics.fmean(run[key] for run in new) / before:.2f}" if before else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `prepare` output (default: synthetic, 64 px)")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dt-pool-") as tmp:
        scratch = Path(tmp)
        data = data_or_synthetic(args.data, scratch)
        runs = {threshold: [] for threshold in SETTINGS}
        for run in range(args.repeats):
            for threshold in SETTINGS:
                runs[threshold].append(one_sweep(data, args.trials, args.epochs, scratch, threshold, run))
    old, new = runs.values()
    rows = [
        ("sweep, seconds (`sweep.json`)", "seconds", ".0f"),
        ("trial-epochs trained", "trial_epochs", ".0f"),
        ("trial start → Datasets built, s (median)", "startup/datasets_s", ".1f"),
        ("Datasets built → worker loop, s", "startup/trainer_s", ".1f"),
        ("worker loop → model ready, s", "startup/model_s", ".1f"),
        ("model ready → first batch, s", "startup/first_batch_s", ".1f"),
        ("a later epoch, s", "later_epoch", ".1f"),
        ("processes Ray started", "processes", ".0f"),
        ("their CPU, s", "cpu", ".0f"),
        ("peak memory of all of them, GB (RSS sum)", "peak_rss_gb", ".2f"),
        ("peak idle workers", "peak_idle", ".0f"),
        ("their peak memory, GB", "peak_idle_rss_gb", ".2f"),
    ]
    names = list(SETTINGS.values())
    lines = [
        "# Idle Ray workers kept 60 s against Ray's 1 s",
        "",
        machine(),
        f"Command: `python benchmarks/bench_worker_pool.py --trials {args.trials} --epochs {args.epochs} "
        f"--repeats {args.repeats}"
        f"{' --data ' + str(args.data) if args.data else ''}{' --write ' + str(args.write) if args.write else ''}`",
        f"Data: {args.data or 'synthetic, 64 px'}; {args.trials} trials of el_cnn, {args.epochs} epochs each (no ASHA "
        "stop), one at a time, a 1-CPU worker; each run on its own local Ray cluster, the settings alternating; "
        "each cell lists the runs in order.",
        "",
        f"| | {names[0]} | {names[1]} | ratio of the means |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {each(old, key, fmt)} | {each(new, key, fmt)} | {ratio(old, new, key)} |"
          for label, key, fmt in rows),
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
