"""What Train's controller polling interval costs a trial whose epochs are short (a small dataset
on a GPU): Ray's default of 2 s against the 0.25 s that `search` sets, side by side in one run.

    python benchmarks/bench_train_poll.py [--trials 3] [--reports 3] [--work 0.5]
        [--write results/benchmarks/train_poll.md]

Each setting runs a Tune sweep on its own local Ray cluster (2 CPUs, the settings `search` gives
a local cluster), one trial at a time. A trial fits a TorchTrainer (one worker, 1 CPU) whose
loop reports `--reports` times, sleeping `--work` seconds before each report in place of an
epoch, so that only Ray's own costs differ. Printed per setting (median over trials): the trial's
start to its worker loop, the loop's start to the end of `fit()`, the time the loop spent in
`report`, and the sweep's wall time; then the ratios of 0.25 s to 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

SETTINGS = ("2.0", "0.25")  # Ray's default, and defect_tune.raytrain.loop.TRAIN_POLL_S


def one_sweep(trials: int, reports: int, work: float, scratch: Path) -> dict:
    """Run in a child process with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S set: one sweep, its timings."""
    import ray
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from defect_tune.raytrain.cluster import start_ray
    from defect_tune.search.trial import fit_and_report

    def loop(config: dict) -> None:
        import ray.train

        started, waited = time.time(), 0.0
        for report in range(reports):
            time.sleep(work)
            before = time.time()
            ray.train.report({"report": report, "loop_started": started, "waited": waited})
            waited += time.time() - before
        ray.train.report({"report": reports, "loop_started": started, "waited": waited})

    def trial(config: dict) -> None:
        started = time.time()
        fit_and_report(lambda callbacks: TorchTrainer(  # as a sweep's trial hands its reports to Tune
            loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"poll-{config['i']}", storage_path=str(scratch / "train"), callbacks=callbacks)))
        tune.report({"report": -1, "trial_started": started, "fit_ended": time.time()})

    start_ray(None, num_cpus=2, include_dashboard=True, configure_logging=False)
    try:
        began = time.time()
        tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0, "memory": 2**20}),
                           param_space={"i": tune.grid_search(list(range(trials)))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=1),
                           run_config=tune.RunConfig(storage_path=str(scratch / "tune"), name="poll", verbose=0))
        results = tuner.fit()
        wall = time.time() - began
    finally:
        ray.shutdown()
    to_loop, loop_to_end, waited = [], [], []
    for result in results:
        rows = result.metrics_dataframe.to_dict("records")
        last_loop = [row for row in rows if row["report"] == reports][-1]
        end = rows[-1]
        to_loop.append(last_loop["loop_started"] - end["trial_started"])
        loop_to_end.append(end["fit_ended"] - last_loop["loop_started"])
        waited.append(last_loop["waited"])
    return {"to_loop": statistics.median(to_loop), "loop_to_end": statistics.median(loop_to_end),
            "waited": statistics.median(waited), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--reports", type=int, default=3)
    parser.add_argument("--work", type=float, default=0.5, help="seconds of stand-in work before each report")
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="dt-poll-") as tmp:
            print(repr(one_sweep(args.trials, args.reports, args.work, Path(tmp))))
        return

    measured = {}
    for setting in SETTINGS:  # each in its own process: Ray reads the setting where the trial starts
        child = subprocess.run([sys.executable, __file__, "--child", "--trials", str(args.trials), "--reports",
                                str(args.reports), "--work", str(args.work)],
                               env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": setting},
                               capture_output=True, text=True, check=True)
        measured[setting] = eval(child.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr of a dict of floats
    old, new = (measured[s] for s in SETTINGS)
    rows = [("trial start → worker loop", "to_loop"), ("worker loop → end of fit()", "loop_to_end"),
            ("of which waiting in `report`", "waited"), (f"sweep of {args.trials} trials, wall", "wall")]
    lines = [
        "# Train's controller polling interval: Ray's 2 s against the 0.25 s `search` sets",
        "",
        machine(),
        f"Command: `python benchmarks/bench_train_poll.py --trials {args.trials} --reports {args.reports} --work "
        f"{args.work}{' --write ' + str(args.write) if args.write else ''}`",
        f"Each trial: one TorchTrainer worker (1 CPU) reporting {args.reports + 1} times, {args.work} s of stand-in "
        f"work before each of the first {args.reports}; {args.trials} trials one at a time; medians over trials.",
        "",
        "| seconds | poll every 2 s (Ray's default) | poll every 0.25 s | 0.25 s / 2 s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {old[key]:.1f} | {new[key]:.1f} | {new[key] / old[key]:.2f} |" for name, key in rows),
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
