"""Where a sweep's CPU goes, by Ray process kind: which of a trial's processes cost the most
CPU and memory to start and run, the target list for cutting trial start-up.

    python benchmarks/bench_trial_cpu.py [--data DIR] [--trials 4] [--epochs 2]
                                         [--write results/benchmarks/trial_cpu.md]

Runs one `defect-tune search` (el_cnn, no augmentation, search's own resource defaults, ASHA's
grace period equal to the epochs so every trial trains to the end) while a thread samples every
process the search started every 0.5 s (`common.ProcessSampler`). Each process is counted under
the last name Ray gave it other than `ray::IDLE` (its actor class or task), so a worker that ran
tasks and then an actor counts under the actor; its CPU is everything it used. Printed per kind:
processes, CPU seconds (all, and per trial) and the largest resident memory of one of them,
then the training workers' share of the total. Sampling every 0.5 s misses processes that live
shorter than that; the total is a lower bound.

Default data: the embedded synthetic set at 64 px (generated into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from common import data_or_synthetic, emit, machine, sampled_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `prepare` output (default: synthetic, 64 px)")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dt-cpu-") as tmp:
        scratch = Path(tmp)
        data = data_or_synthetic(args.data, scratch)
        space = scratch / "space.yaml"
        space.write_text(yaml.safe_dump({
            "num_samples": args.trials, "max_epochs": args.epochs,
            "asha": {"grace_period": args.epochs, "reduction_factor": 2},
            "fixed": {"model": "el_cnn", "batch_size": 64, "augment": "none", "warmup_epochs": 0,
                      "early_stopping_patience": 0},
            "params": {"lr": {"loguniform": [3e-4, 3e-3]}},
        }, sort_keys=False))
        out = scratch / "sweep"
        sampler = sampled_search(data, space, out, "cpu", scratch / "search.log")
        seconds = json.loads((out / "sweep.json").read_text())["seconds"]

    kinds = sorted(sampler.by_kind().items(), key=lambda item: -item[1]["cpu"])
    total = sum(entry["cpu"] for _, entry in kinds)
    workers = sum(entry["cpu"] for kind, entry in kinds if kind == "ray::RayTrainWorker")
    lines = [
        "# Where a sweep's CPU goes, by process kind",
        "",
        machine(),
        f"Command: `python benchmarks/bench_trial_cpu.py --trials {args.trials} --epochs {args.epochs}"
        f"{' --data ' + str(args.data) if args.data else ''}{' --write ' + str(args.write) if args.write else ''}`",
        f"Data: {args.data or 'synthetic, 64 px'}; {args.trials} trials of el_cnn, {args.epochs} epochs each (no ASHA "
        f"stop), `search`'s resource defaults; the sweep took {seconds:.0f} s (`sweep.json`).",
        "",
        "| process kind | processes | CPU s | CPU s per trial | largest RSS, MB |",
        "|---|---:|---:|---:|---:|",
        *(f"| `{kind}` | {entry['processes']} | {entry['cpu']:.1f} | {entry['cpu'] / args.trials:.1f} | "
          f"{entry['peak_rss'] / 2**20:.0f} |" for kind, entry in kinds),
        f"| all | {sum(entry['processes'] for _, entry in kinds)} | {total:.1f} | {total / args.trials:.1f} | |",
        "",
        f"The training workers (`ray::RayTrainWorker`: training, validation, checkpoints, their imports and Ray "
        f"Data reads) used {workers / total:.0%} of the CPU.",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
