"""What running a configuration as a Tune trial under TorchTrainer costs, against the same epochs
trained by `defect-tune train` in this process.

    python benchmarks/bench_trial_overhead.py [--data DIR] [--epochs 4] [--write results/benchmarks/trial_overhead.md]

Both run in this one invocation, one after the other, on the same prepared data and the same
config (el_cnn, batch 64, light augmentation). The trial is a real one-trial `defect-tune search`
(its own local Ray cluster, Ray Data, TorchTrainer, Tune, checkpoints every epoch). Printed:
per-epoch seconds of each, their ratio, and the trial's fixed start-up (its first epoch's time
less a later epoch's), plus the whole command's wall time with Ray's own start and stop.
Default data: the embedded synthetic set at 64 px (generated into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import data_or_synthetic, emit, machine

CONFIG = {"model": "el_cnn", "batch_size": 64, "augment": "light", "warmup_epochs": 0, "early_stopping_patience": 0,
          "lr": 1e-3}


def in_process(data: Path, epochs: int, out: Path) -> dict:
    from defect_tune.core.config import load_config
    from defect_tune.training.train import fit

    config = load_config(None, {**CONFIG, "epochs": epochs})
    started = time.perf_counter()
    results = fit(config, data, out, device="cpu")
    return {"wall": time.perf_counter() - started, "epochs": [row["seconds"] for row in results["history"]]}


def as_trial(data: Path, epochs: int, scratch: Path) -> dict:
    space = scratch / "space.yaml"
    fixed = ", ".join(f"{k}: {v}" for k, v in CONFIG.items() if k != "lr")
    space.write_text(f"num_samples: 1\nmax_epochs: {epochs}\nasha: {{grace_period: {epochs}, reduction_factor: 2}}\n"
                     f"fixed: {{{fixed}}}\nparams:\n  lr: {{choice: [{CONFIG['lr']}]}}\n")
    out = scratch / "search"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "defect_tune", "search", "--data", str(data), "--space", str(space),
                    "--name", "overhead", "--out", str(out), "--cpus-per-worker", "1"],
                   check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (progress,) = (out / "tune" / "overhead").glob("run_trial_*/progress.csv")
    return {"wall": wall, "epochs": pd.read_csv(progress)["time_this_iter_s"].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `prepare` output (default: synthetic, 64 px)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dt-bench-") as tmp:
        scratch = Path(tmp)
        data = data_or_synthetic(args.data, scratch)
        images = json.loads((data / "meta.json").read_text())["splits"]["train"]["images"]
        local = in_process(data, args.epochs, scratch / "train")
        trial = as_trial(data, args.epochs, scratch)

    local_epoch = statistics.median(local["epochs"][1:] or local["epochs"])
    trial_epoch = statistics.median(trial["epochs"][1:])
    startup = trial["epochs"][0] - trial_epoch
    rows = [
        ("`defect-tune train`, in process", local["epochs"][0], local_epoch, 1.0, local["wall"]),
        ("one Tune trial (TorchTrainer, Ray Data)", trial["epochs"][0], trial_epoch, trial_epoch / local_epoch,
         trial["wall"]),
    ]
    lines = [
        f"# Trial overhead: {args.epochs} epochs of one configuration, in process vs as a Tune trial",
        "",
        f"{machine()} Data: {'synthetic 64 px' if args.data is None else args.data}"
        f", {images} training images.",
        f"Command: `python benchmarks/bench_trial_overhead.py{' --write ' + str(args.write) if args.write else ''}`",
        "",
        "| run | first epoch s | later epochs s (median) | per-epoch ratio to in-process | whole command s |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {first:.1f} | {later:.2f} | {ratio:.1f} | {wall:.1f} |"
          for name, first, later, ratio, wall in rows),
        "",
        f"The trial's fixed start-up (first epoch less a later one): {startup:.1f} s. The whole command adds "
        "starting and stopping a local Ray cluster, and the sweep's own bookkeeping.",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
