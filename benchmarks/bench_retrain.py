"""Does `retrain` give the model `train` gives? The same config, the same seeds, the same data.

    python benchmarks/bench_retrain.py --data DIR [--recipe transfer] [--seeds 0,1,2]
        [--tree LABEL=PATH ...] [--work DIR] [--out results/benchmarks/retrain_vs_train.md]

For each seed S: `defect-tune train --recipe R seed=S` once, then, for each --tree (a checkout of
this repository, put first on PYTHONPATH; default: this checkout as `current`), an export of that
train run's config (its thresholds, best epoch and objective; no sweep) retrained with
`defect-tune retrain --holdout val`: train on train, best epoch and thresholds from val. Test
macro AP (threshold-free) of each model, as each command reported it, side by side, and the ratio
of each tree's mean to train's.

Both commands train on one machine here: `train` in its own process, `retrain` as one Ray Train
worker of a local cluster. A run kept in --work is reused, not trained again (delete it to rerun):
the rows name the code each came from, so a table can be rendered again without the hours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_details  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _revision(tree: Path) -> str:
    found = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (found.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def _run(args: list[str], tree: Path | None, log: Path) -> None:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "defect_tune", *args], stdout=handle, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode:
        sys.exit(f"{' '.join(args[:1])} failed ({done.returncode}); see {log}")


def train(data: Path, recipe: str, seed: int, work: Path) -> dict:
    out = work / "train" / f"seed{seed}"
    if not (out / "results.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(["train", "--data", str(data), "--out", str(out), "--recipe", recipe, f"seed={seed}"], None,
             work / "train" / f"seed{seed}.log")
        (out / "code.txt").write_text(_revision(ROOT) + "\n")
    results = json.loads((out / "results.json").read_text())
    return {"ap": results["test"]["macro"]["average_precision"], "best_epoch": results["best_epoch"],
            "seconds": results["seconds"], "code": (out / "code.txt").read_text().strip(), "out": out}


def retrain(data: Path, trained: dict, label: str, tree: Path, seed: int, work: Path) -> dict:
    model = work / label / f"seed{seed}"
    if not (model / "metrics.json").is_file():
        meta = json.loads((data / "meta.json").read_text())
        results = json.loads((trained["out"] / "results.json").read_text())
        export = {"format": 1, "config": yaml.safe_load((trained["out"] / "config.yaml").read_text()),
                  "thresholds": results["thresholds"], "best_epoch": results["best_epoch"],
                  "data": {"classes": meta["classes"], "source_fingerprint": meta.get("source_fingerprint")},
                  "sweep": {"name": "bench-retrain", "trial_id": f"train-seed{seed}"},
                  "objective": {"value": results["best_objective"]}}
        model.parent.mkdir(parents=True, exist_ok=True)
        export_file = model.parent / f"export-seed{seed}.yaml"
        export_file.write_text(yaml.safe_dump(export))
        _run(["retrain", str(export_file), "--data", str(data), "--out", str(model), "--holdout", "val", "--overwrite"],
             tree, model.parent / f"seed{seed}.log")
        (model.parent / f"seed{seed}.code.txt").write_text(_revision(tree) + "\n")
    metrics = json.loads((model / "metrics.json").read_text())
    info = json.loads((model / "model.json").read_text())
    return {"ap": metrics["test"]["macro"]["average_precision"], "best_epoch": info["training"]["best_epoch"],
            "seconds": info["seconds"], "code": (model.parent / f"seed{seed}.code.txt").read_text().strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `prepare` output")
    parser.add_argument("--recipe", default="transfer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="a checkout whose retrain is measured (default: current=this checkout)")
    parser.add_argument("--label", default=None, help="the data's name in the table (default: the folder's)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder; kept runs are reused")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "retrain_vs_train.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    trees = [tuple(item.split("=", 1)) for item in args.tree] or [("current", str(ROOT))]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-retrain-"))

    rows = []
    for seed in seeds:
        trained = train(args.data, args.recipe, seed, work)
        rows.append({"seed": seed, "train": trained,
                     **{label: retrain(args.data, trained, label, Path(path).resolve(), seed, work)
                        for label, path in trees}})
        print(f"seed {seed}: train {trained['ap']:.3f} "
              + " ".join(f"{label} {rows[-1][label]['ap']:.3f}" for label, _ in trees),
              flush=True)

    meta = json.loads((args.data / "meta.json").read_text())
    means = {name: sum(row[name]["ap"] for row in rows) / len(rows)
             for name in ["train", *(label for label, _ in trees)]}
    lines = [
        "# retrain against train: the same config, seeds and data",
        "",
        machine_details(),
        "",
        f"Command: `python benchmarks/bench_retrain.py --data DATA --recipe {args.recipe} --seeds {args.seeds}"
        + "".join(f" --tree {label}=TREE" for label, _ in trees) + "`",
        "",
        f"Data: {args.label or args.data.name}, {meta['splits']['train']['images']} train / "
        f"{meta['splits']['val']['images']} val / {meta['splits']['test']['images']} test images at "
        f"{meta['image']['height']}x{meta['image']['width']}; test positives per class "
        f"{meta['splits']['test']['positives']}.",
        "",
        f"`train --recipe {args.recipe} seed=S`, then `retrain --holdout val` of an export of that run's config. "
        "Test macro AP as each command reported it; best epoch in brackets (picked on val by both).",
        "",
        "| seed | train | " + " | ".join(f"retrain ({label}: {', '.join(sorted({row[label]['code'] for row in rows}))})"
                                           for label, _ in trees) + " |",
        "|---:|---:|" + "---:|" * len(trees),
    ]
    for row in rows:
        lines.append(f"| {row['seed']} | {row['train']['ap']:.3f} ({row['train']['best_epoch']}) | "
                     + " | ".join(f"{row[label]['ap']:.3f} ({row[label]['best_epoch']})" for label, _ in trees)
                     + " |")
    lines.append("| mean | " + " | ".join(f"{means[name]:.3f}" for name in ["train", *(label for label, _ in trees)])
                 + " |")
    lines.append("| ratio to train | 1.000 | "
                 + " | ".join(f"{means[label] / means['train']:.3f}" for label, _ in trees) + " |")
    lines += ["", "Wall seconds per run (train: in-process; retrain: a local Ray cluster, "
                  "ONNX export and checks included): "
              + "; ".join(f"{name} {sum(row[name]['seconds'] for row in rows) / len(rows):.0f}"
                          for name in ["train", *(label for label, _ in trees)])
              + " (as measured: a run that shared the cores with other work took longer).",
              f"Train runs' code: {', '.join(sorted({row['train']['code'] for row in rows}))} (the train path is the "
              "same in each)."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
