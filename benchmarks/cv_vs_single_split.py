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
    run("retrain", str(out / f"{name}.yaml"), "--data", str(data), "--out", str(out / f"{name}-model"), "--holdout", "val")
    metrics = json.loads((out / f"{name}-model" / "metrics.json").read_text())
    best = summary["best"]
    return {"name": name, "cv": cv, "seed": seed, "wall": wall, "trial": best["trial_id"], "params": best["params"],
            "val": best[summary["objective"]], "test_recall": metrics["test_macro_recall"],
            "test_guarded": metrics["test_guarded_macro_recall"],
            "rarest_val": min(json.loads((data / "meta.json").read_text())["splits"]["val"]["positives"].values())}


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


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
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="dt-cv-"))
    rows = []
    if args.rows is not None:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.startswith("{")]
        args.seeds = sorted({row["seed"] for row in rows})
    for seed in args.seeds if args.rows is None else []:
        data = scratch / f"data-{seed}"
        if not (data / "meta.json").is_file():
            run("prepare", str(args.source), "--format", "voc", "--out", str(data), "--image-size", str(args.image_size),
                "--long-tail", "50", "--seed", str(seed), "--workers", "1")
        for cv in (0, args.folds):
            rows.append(sweep_and_test(data, scratch, f"{'cv' if cv else 'single'}-{seed}", args.space, args.num_samples, seed, cv))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Single split vs cross-validated trials on NEU-DET long-tail 50",
        "",
        machine(),
        f"Command: `python benchmarks/cv_vs_single_split.py --source {args.source} --seeds {' '.join(map(str, args.seeds))} "
        f"--space {args.space} --num-samples {args.num_samples} --folds {args.folds} --image-size {args.image_size}`",
        f"Each split seed S: `defect-tune prepare --long-tail 50 --seed S --image-size {args.image_size}`; `search --space "
        f"{args.space} --num-samples {args.num_samples} --seed S` with `--cv 0` and with `--cv {args.folds}`; each winner "
        "exported and retrained with `retrain --holdout val` (train on train, thresholds from val), then scored on the "
        "untouched test split.",
        "",
        "| split seed | search | rarest class's val positives | winner | val objective | test macro recall | test guarded macro recall | sweep wall |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['seed']} | {'--cv ' + str(row['cv']) if row['cv'] else 'single split'} | {row['rarest_val']} | "
                     f"{_params(row['params'])} | {row['val']:.3f} | {row['test_recall']:.3f} | {row['test_guarded']:.3f} | "
                     f"{row['wall'] / 60:.1f} min |")
    lines += ["", "| search | mean test macro recall | mean test guarded macro recall | mean sweep wall |", "|---|---:|---:|---:|"]
    for cv in (0, args.folds):
        picked = [r for r in rows if r["cv"] == cv]
        if not picked:
            continue
        lines.append(f"| {'--cv ' + str(cv) if cv else 'single split'} | {statistics.mean(r['test_recall'] for r in picked):.3f} | "
                     f"{statistics.mean(r['test_guarded'] for r in picked):.3f} | "
                     f"{statistics.mean(r['wall'] for r in picked) / 60:.1f} min |")
    emit(lines, args.write)


if __name__ == "__main__":
    main()
