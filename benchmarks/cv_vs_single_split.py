"""Does cross-validating every trial pick better winners on a long tail? Single split vs --cv 5.

    python benchmarks/cv_vs_single_split.py --source ../shared/datasets/neu-det [--seeds 0 1 2]
        [--space quick] [--num-samples 6] [--folds 5] [--image-size 64] [--scratch DIR]
        [--write results/cv_vs_single_split.md]

For each split seed: `prepare --long-tail 50 --seed S` (the subsample and the split both follow
the seed), then the same search twice with the same TPE seed, once on prepare's split and once
with `--cv 5`. Each sweep's winner is retrained the same way (`retrain --holdout val`: train on
train, thresholds from val) so that only the choice of configuration differs, and scored on the
untouched test split. A row per sweep: the winner, its validation objective, its test macro
recall (at the thresholds learned on val) and test guarded macro recall, and the sweep's wall time.
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

from common import emit, machine


def run(*args: str) -> None:
    command = [sys.executable, "-m", "defect_tune", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def sweep_and_test(data: Path, out: Path, name: str, space: str, samples: int, seed: int, cv: int) -> dict:
    started = time.perf_counter()
    run("search", "--data", str(data), "--space", space, "--name", name, "--out", str(out / name),
        "--num-samples", str(samples), "--seed", str(seed), "--cv", str(cv))
    wall = time.perf_counter() - started
    summary = json.loads((out / name / "sweep.json").read_text())
    run("export", str(out / name), "--out", str(out / f"{name}.yaml"))
    run("retrain", str(out / f"{name}.yaml"), "--data", str(data), "--out", str(out / f"{name}-model"),
        "--holdout", "val")
    metrics = json.loads((out / f"{name}-model" / "metrics.json").read_text())
    best = summary["best"]
    return {"name": name, "cv": cv, "seed": seed, "wall": wall, "trial": best["trial_id"], "params": best["params"],
            "val": best[summary["objective"]], "test_recall": metrics["test_macro_recall"],
            "test_interval": metrics["test"]["macro"]["recall_interval"],
            "test_guarded": metrics["test_guarded_macro_recall"],
            "rarest_val": min(json.loads((data / "meta.json").read_text())["splits"]["val"]["positives"].values())}


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


TRIAL_COLUMNS = ["seed", "search", "trial_index", "configuration", "objective", "low", "high", "stop_reason", "epochs"]


def trial_rows(scratch: Path, row: dict) -> list[dict]:
    """Every trial of one sweep, from its leaderboard in `scratch` (none when it is not there)."""
    import pandas as pd

    board_file = scratch / row["name"] / "leaderboard.csv"
    if not board_file.is_file():
        return []
    board = pd.read_csv(board_file).sort_values("trial_index")
    objective = json.loads((scratch / row["name"] / "sweep.json").read_text())["objective"]
    rows = []
    for _, trial in board.iterrows():
        params = {c.removeprefix("param/"): trial[c] for c in board.columns
                  if c.startswith("param/") and pd.notna(trial[c])}
        rows.append({"seed": row["seed"], "search": f"--cv {row['cv']}" if row["cv"] else "single split",
                     "trial_index": int(trial["trial_index"]), "configuration": _params(params),
                     "objective": trial[objective], "low": trial[f"{objective}_low"],
                     "high": trial[f"{objective}_high"],
                     "stop_reason": trial["stop_reason"], "epochs": int(trial["epochs"])})
    return rows


def trial_table(trials: list[dict], seed: int) -> list[str]:
    """One seed's trials side by side: each configuration's objective (95 % interval) and how it
    ended under each search, the configurations matched by their parameters; each winner in bold."""
    single = {t["configuration"]: t for t in trials if t["seed"] == seed and t["search"] == "single split"}
    folded = {t["configuration"]: t for t in trials if t["seed"] == seed and t["search"] != "single split"}
    if not single or not folded:
        return []
    winners = [max(group.values(), key=lambda t: t["objective"]) for group in (single, folded)]

    def cell(trial: dict | None) -> str:
        if trial is None:
            return "not tried | "
        value = f"**{trial['objective']:.3f}**" if trial in winners else f"{trial['objective']:.3f}"
        ended = trial["stop_reason"] + (f", epoch {trial['epochs']}" if trial["stop_reason"] == "asha" else "")
        return f"{value} ({trial['low']:.2f}-{trial['high']:.2f}) | {ended}"

    search = next(iter(folded.values()))["search"]
    lines = ["", f"Split seed {seed}: each trial's objective at its best epoch (95 % interval), and how it ended.", "",
             f"| # | configuration | single split | stopped by | `{search}` | stopped by |",
             "|---|---|---:|---|---:|---|"]
    order = sorted(set(single) | set(folded), key=lambda c: (single.get(c) or folded[c])["trial_index"])
    for number, configuration in enumerate(order, 1):
        lines.append(f"| {number} | {configuration} | {cell(single.get(configuration))} | "
                     f"{cell(folded.get(configuration))} |")
    return lines


def paired(rows: list[dict], folds: int) -> list[str]:
    """Per split seed, the 5-fold winner against the single split's: same configuration or not, and
    the difference in test macro recall; then the mean difference and the wall-time ratio."""
    seeds = sorted({r["seed"] for r in rows})
    pairs = []
    for seed in seeds:
        by_cv = {r["cv"]: r for r in rows if r["seed"] == seed}
        if 0 in by_cv and folds in by_cv:
            pairs.append((seed, by_cv[0], by_cv[folds]))
    if not pairs:
        return []
    lines = ["", f"| split seed | same winner | test macro recall, --cv {folds} minus single split | "
                 f"wall time, --cv {folds} / single split |",
             "|---|---|---:|---:|"]
    for seed, single, folded in pairs:
        lines.append(f"| {seed} | {'yes' if single['params'] == folded['params'] else 'no'} | "
                     f"{folded['test_recall'] - single['test_recall']:+.3f} | {folded['wall'] / single['wall']:.1f}x |")
    differences = [folded["test_recall"] - single["test_recall"] for _, single, folded in pairs]
    spread = f" (sd {statistics.stdev(differences):.3f} over {len(differences)} seeds)" if len(differences) > 1 else ""
    lines.append(f"| mean | | {statistics.mean(differences):+.3f}{spread} | "
                 f"{statistics.mean(f['wall'] / s['wall'] for _, s, f in pairs):.1f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="NEU-DET (Pascal VOC)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--space", default="quick")
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--rows", type=Path, default=None,
                        help="build the table from the JSON lines an earlier (possibly interrupted) run printed")
    parser.add_argument("--trials", type=Path, default=None,
                        help="a CSV of every trial of every sweep: written from the leaderboards in --scratch when "
                             "they are there, else read (the per-trial tables)")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="dt-cv-"))
    rows = []
    if args.rows is not None:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.startswith("{")]
        args.seeds = sorted({row["seed"] for row in rows})
    for seed in args.seeds if args.rows is None else []:
        data = scratch / f"data-{seed}"
        if not (data / "meta.json").is_file():
            run("prepare", str(args.source), "--format", "voc", "--out", str(data),
                "--image-size", str(args.image_size), "--long-tail", "50", "--seed", str(seed), "--workers", "1")
        for cv in (0, args.folds):
            rows.append(sweep_and_test(data, scratch, f"{'cv' if cv else 'single'}-{seed}", args.space,
                                       args.num_samples, seed, cv))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Single split vs cross-validated trials on NEU-DET long-tail 50",
        "",
        machine(),
        f"Command: `python benchmarks/cv_vs_single_split.py --source {args.source} --seeds "
        f"{' '.join(map(str, args.seeds))} --space {args.space} --num-samples {args.num_samples} --folds {args.folds} "
        f"--image-size {args.image_size}`",
        f"Each split seed S: `defect-tune prepare --long-tail 50 --seed S --image-size {args.image_size}`; `search "
        f"--space {args.space} --num-samples {args.num_samples} --seed S` with `--cv 0` and with `--cv {args.folds}`; "
        "each winner exported and retrained with `retrain --holdout val` (train on train, thresholds from val), then "
        "scored on the untouched test split.",
        "",
        "| split seed | search | rarest class's val positives | winner | val objective | "
        "test macro recall (95 % bootstrap) | test guarded macro recall | sweep wall |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        kept = scratch / f"{row['name']}-model" / "metrics.json"  # rows printed before the interval was recorded
        if "test_interval" not in row and kept.is_file():
            row["test_interval"] = json.loads(kept.read_text())["test"]["macro"]["recall_interval"]
        low, high = row.get("test_interval") or (float("nan"), float("nan"))
        lines.append(f"| {row['seed']} | {'--cv ' + str(row['cv']) if row['cv'] else 'single split'} | "
                     f"{row['rarest_val']} | {_params(row['params'])} | {row['val']:.3f} | {row['test_recall']:.3f} "
                     f"({low:.2f}-{high:.2f}) | {row['test_guarded']:.3f} | {row['wall'] / 60:.1f} min |")
    lines += ["", "| search | mean test macro recall | mean test guarded macro recall | mean sweep wall |",
              "|---|---:|---:|---:|"]
    for cv in (0, args.folds):
        picked = [r for r in rows if r["cv"] == cv]
        if not picked:
            continue
        lines.append(f"| {'--cv ' + str(cv) if cv else 'single split'} | "
                     f"{statistics.mean(r['test_recall'] for r in picked):.3f} | "
                     f"{statistics.mean(r['test_guarded'] for r in picked):.3f} | "
                     f"{statistics.mean(r['wall'] for r in picked) / 60:.1f} min |")
    lines += paired(rows, args.folds)
    trials = [t for row in rows for t in trial_rows(scratch, row)]
    if args.trials is not None:
        import pandas as pd

        if trials:
            pd.DataFrame(trials, columns=TRIAL_COLUMNS).to_csv(args.trials, index=False)
        elif args.trials.is_file():
            trials = pd.read_csv(args.trials).to_dict("records")
    for seed in args.seeds:
        lines += trial_table(trials, seed)
    emit(lines, args.write)


if __name__ == "__main__":
    main()
