"""Every benchmark, one after another, each writing its table to results/benchmarks/.

    python benchmarks/run_all.py

Run it alone on the machine: the figures are wall-clock rates, and every benchmark prints ratios
measured side by side within its own run, so they compare like with like.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "benchmarks"
BENCHMARKS = {
    "bench_ingest.py": "ingest.md",
    "bench_trial_overhead.py": "trial_overhead.md",
    "bench_prepare.py": "prepare_throughput.md",
    "bench_asha.py": "asha_vs_fifo.md",
    "bench_sweep.py": "sweep_efficiency.md",
    "bench_train_poll.py": "train_poll.md",
    "bench_worker_pool.py": "worker_pool.md",
    "bench_trial_cpu.py": "trial_cpu.md",
    "bench_augment.py": "augment.md",
}


def main() -> None:
    failed = []
    for script, table in BENCHMARKS.items():
        print(f"== {script}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), "--write", str(RESULTS / table)])
        if done.returncode:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
