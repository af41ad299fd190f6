"""What ASHA saves: the same Optuna-proposed trials run to full budget (FIFO) and under ASHA.

    python benchmarks/bench_asha.py [--data DIR] [--trials 8] [--epochs 4] [--seed 0]
        [--write results/benchmarks/asha_vs_fifo.md]

One invocation, two real `defect-tune search` runs one after the other on the same data, space
(the bundled quick.yaml: seed CNNs, loss, class weighting, learning rate) and seed:

1. FIFO: TPE proposes the trials (after the space's two starting points) and every trial trains all
   `--epochs` (ASHA's grace period = the budget, so it never stops one).
2. ASHA (grace 1, reduction factor 2): exactly the trials FIFO ran, replayed in the same order as
   `points_to_evaluate`, so the two runs differ only in the scheduler.

Printed for each: epochs trained, wall time, best objective, and the epochs (in the order they
were reported) until the sweep first reached FIFO's best; then ASHA's share of each. Training
is not bit-reproducible across runs (augmentation is drawn in Ray Data tasks), so a configuration
can score a little differently in the two runs. Default data: the embedded synthetic set at 64 px.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from common import data_or_synthetic, emit, machine

from defect_tune.core.config import OBJECTIVE
from defect_tune.search.space import resolve_space


def write_space(path: Path, trials: int, epochs: int, grace: int, points: list[dict] | None) -> Path:
    raw = yaml.safe_load(resolve_space("quick").read_text())
    raw.update(num_samples=trials, max_epochs=epochs, asha={"grace_period": grace, "reduction_factor": 2})
    if points is not None:
        raw["points_to_evaluate"] = points
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep(data: Path, space: Path, name: str, scratch: Path, seed: int) -> dict:
    out = scratch / name
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "defect_tune", "search", "--data", str(data), "--space", str(space),
                           "--name", name, "--out", str(out), "--seed", str(seed)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} sweep failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    board = pd.read_csv(out / "leaderboard.csv")
    epochs = []  # every epoch any trial reported, in the order reported
    for progress in (out / "tune" / name).glob("run_trial_*/progress.csv"):
        table = pd.read_csv(progress)
        epochs += [(row.timestamp, row.trial_id, row.epoch, getattr(row, OBJECTIVE)) for row in table.itertuples()]
    epochs.sort()
    return {"wall": wall, "board": board, "epochs": epochs,
            "order": board.sort_values("trial_index")["trial_id"].tolist()}


def epochs_to_reach(epochs: list[tuple], target: float) -> int | None:
    for count, (_, _, _, value) in enumerate(epochs, start=1):
        if value >= target - 1e-9:
            return count
    return None


def params_of(row: pd.Series) -> dict:
    return {k.removeprefix("param/"): (v.item() if hasattr(v, "item") else v)
            for k, v in row.items() if k.startswith("param/") and not (isinstance(v, float) and math.isnan(v))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `prepare` output (default: synthetic, 64 px)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dt-bench-") as tmp:
        scratch = Path(tmp)
        data = data_or_synthetic(args.data, scratch)
        fifo = sweep(data, write_space(scratch / "fifo.yaml", args.trials, args.epochs, args.epochs, None),
                     "fifo", scratch, args.seed)
        by_id = fifo["board"].set_index("trial_id")
        replay = [{"name": f"fifo_{index}", "params": params_of(by_id.loc[trial])}
                  for index, trial in enumerate(fifo["order"])]
        asha = sweep(data, write_space(scratch / "asha.yaml", args.trials, args.epochs, 1, replay),
                     "asha", scratch, args.seed)

    target = float(fifo["board"][OBJECTIVE].max())
    rows = {}
    for name, run in (("FIFO (full budget)", fifo), ("ASHA (grace 1, factor 2)", asha)):
        board = run["board"]
        rows[name] = {"epochs": int(board["epochs"].sum()), "wall": run["wall"], "best": float(board[OBJECTIVE].max()),
                      "to_target": epochs_to_reach(run["epochs"], target),
                      "stopped": int((board["stop_reason"] == "asha").sum())}
    f, a = rows["FIFO (full budget)"], rows["ASHA (grace 1, factor 2)"]
    reached = "never" if a["to_target"] is None else f"{a['to_target']}"
    ratio = "-" if a["to_target"] is None else f"{a['to_target'] / f['to_target']:.2f}"
    lines = [
        "# Search efficiency: ASHA vs the same trials at full budget (FIFO)",
        "",
        machine(),
        f"Command: `{' '.join(['python', 'benchmarks/bench_asha.py', *sys.argv[1:]])}`",
        f"Data: {args.data or 'synthetic, 64 px'}; space: quick.yaml, {args.trials} trials, {args.epochs} epochs, seed "
        f"{args.seed}; objective {OBJECTIVE}.",
        "",
        "| run | epochs trained | trials stopped early | wall s | best objective | "
        "epochs until FIFO's best was reached |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['epochs']} | {row['stopped']} | {row['wall']:.0f} | {row['best']:.4f} | "
                     f"{'never' if row['to_target'] is None else row['to_target']} |")
    lines += [
        "",
        f"ASHA / FIFO: epochs {a['epochs'] / f['epochs']:.2f}, wall {a['wall'] / f['wall']:.2f}, "
        f"best objective {a['best'] - f['best']:+.4f}; epochs to reach FIFO's best {target:.4f}: {reached} "
        f"(ratio {ratio}).",
        "Wall time includes each trial's fixed start-up (see trial_overhead.md), which ASHA does not save.",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
