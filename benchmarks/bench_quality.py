"""Does the README flow (search, export, retrain) train a better model than the best single recipe?

    python benchmarks/bench_quality.py [--datasets neu,neu-lt50,elpv] [--data DIR ...] [--seeds 0,1,2]
        [--train-seeds 0,1] [--max-seeds neu=1,neu-lt50=2,elpv=1 | --full] [--image-size 64]
        [--space defects] [--budget-factor 3] [--num-samples N] [--work DIR]
        [--out results/benchmarks/quality.md] [--keys key=value ...] [--render-only]

Issue 29's question. For each dataset and split seed K (`prepare --seed K`: a different split, and
for NEU-DET long-tail 50 a different subsample; for the synthetic set also a different draw of
images, since its generator takes the same seed), these models, all scored on the untouched test
split:

  (a)  the plain recipe from scratch: `defect-tune train --recipe scratch seed=S`;
  (a') the plain transfer recipe: `defect-tune train --recipe transfer seed=S` (EfficientNet-Lite0
       from the installed ImageNet weights);
  (b)  each of the space's `points_to_evaluate` other than `baseline` and `transfer` (those two
       are (a) and (a')), trained by `train --config` with the space's fixed values, the point's
       parameters and the space's `max_epochs`, as the sweep trains it, and `seed=S`;
  (c)  the README flow: `search --space defects --time-budget T --seed K`, `export`,
       `retrain --holdout val` (train on train, best epoch and thresholds from val), with
       T = --budget-factor x the wall time of the slower of (a) and (a') on this dataset and split
       seed, at the first training seed (trials start until T runs out unless --num-samples caps them).

The single recipes (a), (a') and (b) are trained once per training seed S (--train-seeds), so that
training noise shows beside the split's: the tables give each training seed's figures and their
mean, and every comparison takes, per split seed, the mean over training seeds. (c) runs once per
split seed, as a user would run it.

The verdict counts the real sets only: NEU-DET (`neu`), NEU-DET long-tail 50 (`neu-lt50`) and ELPV
(`elpv`, `prepare --format elpv`, the `elpv` extra). The synthetic set and folders given with --data
are smoke data, shown and marked outside the verdict. Per real set, best_single is whichever of (a),
(a') and the (b)s has the highest mean test macro AP over the split seeds (c) was scored on.
  Goal 1: (c)'s mean test macro AP >= best_single's on every real set.
  Goal 2: on at least one real set, the paired 95 % bootstrap interval of the mean over split seeds
          of (c) - best_single lies above 0.
A single recipe that failed on some split seed leaves its set's goals undetermined unless (c) is
already below another single recipe there.

Per model: test macro average precision (AP, threshold-free) and test macro recall at the
thresholds learned on validation (the precision-floor rule), each with a 95 % bootstrap interval
over test images; test macro precision; the wall time of its commands. Neither `train` nor
`retrain` saves test probabilities, so this script reloads each model's weights (`best.pt`,
`model.safetensors`), predicts the test split again, checks that the recomputed macro AP equals the
one the command reported, and keeps those probabilities in the scratch folder. The paired interval
of (c) - a single recipe redraws every split seed's test images on each bootstrap draw and, on the
same images, takes (c)'s macro AP minus the mean of the single recipe's training seeds' macro APs:
paired against each training seed, then averaged, so that the interval is of the figure the tables
report (averaging the probabilities instead would score an ensemble, which none of the rows is).
It covers test-image noise and the training seeds run, not the seeds not run.

Seeds and the cut. Time on the 2-core CPU, an estimate from resnet18 at 64 px taking about 5-7 s per
epoch of 840 training images: the plain recipe's 30 epochs (R) take about 4.5 min on NEU-DET (about
1260 training images), 1.4 min on its long-tail 50 (about 390) and 6.5 min on ELPV (about 1840, its
300 px cells prepared down to 64 px). Taking (a') (15 epochs of EfficientNet-Lite0) to cost at most
about R and the EL seed's CNN about 0.4 R, one split seed costs at most about 2 R (a) + 2 R (a') +
0.8 R (b) + 3 R (the sweep) + R (retrain) + 2 min (prepare, Ray's starts), about 9 R + 2 min: 42,
14 and 60 min. Every real set on 3 split seeds would take about 6 h, so by default
`--max-seeds neu=1,neu-lt50=2,elpv=1` keeps the first split seed of NEU-DET and ELPV and the first
two of the long-tail set: about 2.2 h, an estimate (a retrain of a winner with a larger backbone or
input takes longer). The Markdown says which seeds each set ran and the whole run's measured time.
`--full` (meant for a GPU) runs every dataset on every split seed. On a machine where torch sees a
GPU, `train` uses it and `search` and `retrain` get `--gpus-per-worker 1`, one model on the GPU at
a time as `train` has it.

Folders given with --data are used as prepared (their split cannot change): there split seed K
only varies the training (`seed=1000 K + S`, `retrain --seed 1000 K`) and is the sweep's TPE seed.
Every row goes to the rows file (--out with .jsonl) as soon as it is measured, so a killed run
keeps what finished; `--render-only` writes the Markdown from that file alone (the paired intervals
need the scratch folder's probabilities). A fresh run replaces the rows file. A step that fails is
recorded in its row and the run goes on. `--keys` are passed to every single recipe, (a), (a') and
(b), for smoke runs (e.g. `--keys epochs=1`); the Markdown then says the figures measure nothing.

Run it alone on the machine: the single recipes' wall time sets the sweep's budget, so another
job's load during either changes what the sweep gets.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from common import NEU_DET, emit, machine_details

from defect_tune.core.metrics import BOOTSTRAP_SAMPLES, CONFIDENCE
from defect_tune.search.space import RECIPE_POINTS, load_space, resolve_space, space_name

DATASETS = {"neu": "NEU-DET", "neu-lt50": "NEU-DET long-tail 50", "elpv": "ELPV", "synthetic": "synthetic EL"}
REAL = ("neu", "neu-lt50", "elpv")  # the sets the verdict counts; the others are smoke data
ARMS = {"a": "(a) scratch", "a'": "(a') transfer", "c": "(c) README flow"}
# First split seeds kept per set so that the default run takes about two hours on 2 cores (docstring).
DEFAULT_MAX_SEEDS = "neu=1,neu-lt50=2,elpv=1"


# ---- running the commands ------------------------------------------------------------------------

def call(args: list[str], log: Path, timeout: float | None = None) -> tuple[float, str | None]:
    """Run `defect-tune ARGS` with its output in `log`; its wall time and, if it failed, why (one line).
    Its own process group, so a timeout or Ctrl-C also ends what it started (Ray's processes)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "defect_tune", *args], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except BaseException as stop:  # the timeout, or Ctrl-C
            _end(process)
            if not isinstance(stop, subprocess.TimeoutExpired):
                raise
            return time.perf_counter() - started, f"timed out after {timeout:.0f} s (log {log})"
    wall = time.perf_counter() - started
    return wall, None if code == 0 else f"exit {code}: {_reason(log)} (log {log})"


def _end(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _reason(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith(("error:", "training failed", "Error", "No such option"))]
    return (marked or lines or ["no output"])[-1][:300]


def cli_has(command: str, option: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "defect_tune", command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    return option in done.stdout + done.stderr


def gpu_options() -> list[str]:
    """`search` and `retrain` train on CPUs unless told; `train` takes a visible GPU by itself."""
    import torch

    return ["--gpus-per-worker", "1"] if torch.cuda.is_available() else []


# ---- scoring ------------------------------------------------------------------------------------------

def average_precision(p: np.ndarray, y: np.ndarray) -> float:
    """sklearn's average_precision_score (sum over thresholds of recall step x precision, tied
    scores one threshold), in numpy: fast enough to bootstrap."""
    order = np.argsort(-p, kind="mergesort")
    p, y = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the last image of each distinct score
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def macro_ap(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """Mean AP over the classes with positives and negatives here, as `metrics.evaluate` averages."""
    values = [average_precision(probs[:, c], targets[:, c]) for c in range(targets.shape[1])
              if 0 < targets[:, c].sum() < len(targets)]
    return float(np.mean(values)) if values else None


def _percentiles(values: list[float]) -> list[float] | None:
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if values else None


def bootstrap_ap(probs: np.ndarray, targets: np.ndarray, seed: int = 0) -> list[float] | None:
    """Percentile interval (CONFIDENCE) of macro AP over test images drawn with replacement."""
    rng = np.random.default_rng(seed)
    n, values = len(targets), []
    for _ in range(BOOTSTRAP_SAMPLES):
        draw = rng.integers(0, n, n)
        value = macro_ap(probs[draw], targets[draw])
        if value is not None:
            values.append(value)
    return _percentiles(values)


def paired_mean_interval(pairs: list[tuple[np.ndarray, list[np.ndarray], np.ndarray]],
                         seed: int = 0) -> list[float] | None:
    """Percentile interval (CONFIDENCE) of the mean over split seeds of one model's test macro AP
    minus the mean of another's over its training seeds. `pairs`: per split seed, (the first
    model's probabilities, the other's per training seed, targets). Each draw takes every split
    seed's test images with replacement, the same images for every model of that seed."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(BOOTSTRAP_SAMPLES):
        differences = []
        for probs, others, targets in pairs:
            draw = rng.integers(0, len(targets), len(targets))
            ours = macro_ap(probs[draw], targets[draw])
            theirs = [macro_ap(other[draw], targets[draw]) for other in others]
            if ours is not None and None not in theirs:
                differences.append(ours - statistics.mean(theirs))
        if len(differences) == len(pairs):
            means.append(statistics.mean(differences))
    return _percentiles(means)


def predict_test(model, data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The model's sigmoid probabilities on the test split, preprocessed as every driver does."""
    import torch

    from defect_tune.data.shards import load_split, read_meta, to_tensor

    meta = read_meta(data)
    images, labels, _ = load_split(data, "test", meta)
    model = model.to("cpu").eval()
    with torch.no_grad():
        probs = [torch.sigmoid(model(to_tensor(images[i:i + 64])).float()).numpy() for i in range(0, len(images), 64)]
    return np.concatenate(probs), labels, meta["classes"]


def load_trained(out: Path, num_classes: int):
    """A `defect-tune train` output's best epoch's network (its own weights: no ImageNet download)."""
    from defect_tune.core.config import load_config
    from defect_tune.training.models import build_model
    from defect_tune.training.train import load_checkpoint

    config = load_config(out / "config.yaml", {"pretrained": False, "pretrained_path": None})
    model = build_model(config, num_classes)
    load_checkpoint(out / "best.pt", model)
    return model


def score(row: dict, test: dict, load_model, data: Path, block: Path) -> None:
    """Fill `row` with the test figures the command reported and AP's interval from recomputed
    probabilities, which are kept in `block` for the paired intervals."""
    macro = test["macro"]
    row.update(status="ok", test_ap=macro.get("average_precision"), test_recall=macro.get("recall"),
               test_recall_interval=macro.get("recall_interval"), test_precision=macro.get("precision"),
               test_images=test.get("samples"))
    try:
        meta = json.loads((data / "meta.json").read_text())
        probs, targets, _ = predict_test(load_model(len(meta["classes"])), data)
    except Exception as error:  # noqa: BLE001 - the reported figures stand without the interval
        row["notes"].append(f"no AP interval: test probabilities could not be recomputed ({type(error).__name__}: "
                            f"{error})")
        return
    recomputed = macro_ap(probs, targets)
    if row["test_ap"] is None or recomputed is None or abs(recomputed - row["test_ap"]) > 1e-4:
        row["notes"].append(f"recomputed test macro AP {recomputed} differs from the reported {row['test_ap']}; "
                            "the intervals are of the recomputed one")
    row["test_ap_interval"] = bootstrap_ap(probs, targets)
    np.savez_compressed(probs_file(block, row["name"]), probs=probs, targets=targets)


def probs_file(block: Path, name: str) -> Path:
    return block / f"test-probs-{name}.npz"


# ---- the models ---------------------------------------------------------------------------------------------

def new_row(dataset: str, label: str, seed: int, arm: str, config: str, train_seed: int | None = None) -> dict:
    """A model's row; `name` names its files in the split seed's folder."""
    name = config if train_seed is None else f"{config}-t{train_seed}"
    return {"row": "config", "dataset": dataset, "label": label, "seed": seed, "train_seed": train_seed, "arm": arm,
            "config": config, "name": name, "status": "failed", "error": None, "wall_s": None, "test_ap": None,
            "test_ap_interval": None, "test_recall": None, "test_recall_interval": None, "test_precision": None,
            "notes": []}


def attempt(row: dict, work, *args) -> None:
    """`work(row, *args)`; an exception of this script's own (an output not as expected) fails the row, not the run."""
    try:
        work(row, *args)
    except Exception as error:  # noqa: BLE001 - recorded in the row; the run goes on
        row.update(status="failed", error=row["error"] or f"{type(error).__name__}: {error}")


def train_model(row: dict, data: Path, block: Path, options: list[str], keys: list[str], config=None) -> None:
    """`defect-tune train` with `options` and `keys`, and with `config` (a TrainConfig) as its --config
    file when given."""
    out, config_file = block / row["name"], block / f"{row['name']}.yaml"
    shutil.rmtree(out, ignore_errors=True)
    if config is not None:
        config_file.write_text(config.to_yaml())
        options = [*options, "--config", str(config_file)]
    args = ["train", "--data", str(data), "--out", str(out), *options, *keys]
    row["command"] = shlex.join(["defect-tune", *args])
    row["wall_s"], row["error"] = call(args, block / f"{row['name']}.log")
    if row["error"]:
        return
    results = json.loads((out / "results.json").read_text())
    row.update(best_epoch=results.get("best_epoch"), epochs_run=results.get("epochs_run"),
               train_s=results.get("seconds"))
    score(row, results["test"], lambda classes: load_trained(out, classes), data, block)


def sweep_model(row: dict, data: Path, block: Path, space: Path, seed: int, budget: float, use_budget: bool,
                num_samples: int | None, retrain_seed: int | None, gpu: list[str]) -> None:
    """The README flow: search within the budget, export its pick, retrain it."""
    from defect_tune.production.model_dir import load_model

    results, export, model = block / "sweep", block / "sweep.yaml", block / "sweep-model"
    for path in (results, model):
        shutil.rmtree(path, ignore_errors=True)
    search = ["search", "--data", str(data), "--space", str(space), "--name", f"quality-{block.name}",
              "--out", str(results), "--seed", str(seed), *gpu,
              *(["--num-samples", str(num_samples)] if num_samples else [])]
    timeout = None
    if use_budget:
        search += ["--time-budget", f"{round(budget)}s"]
        timeout = max(2 * budget, budget + 900)  # a sweep that ignores its budget is stopped, not waited for
    retrain = ["retrain", str(export), "--data", str(data), "--out", str(model), "--holdout", "val", *gpu,
               *(["--seed", str(retrain_seed)] if retrain_seed is not None else [])]
    steps = [("search", search, timeout), ("export", ["export", str(results), "--out", str(export)], None),
             ("retrain", retrain, None)]
    row.update(command=" && ".join(shlex.join(["defect-tune", *args]) for _, args, _ in steps), budget_s=budget,
               budget_applied=use_budget, wall_s=0.0, step_s={})
    for name, args, limit in steps:
        wall, error = call(args, block / f"sweep-{name}.log", limit)
        row["step_s"][name], row["wall_s"] = wall, row["wall_s"] + wall
        if name == "search" and (results / "sweep.json").is_file():
            summary = json.loads((results / "sweep.json").read_text())
            row.update(trials=summary.get("trials"), stop_reasons=summary.get("stop_reasons"),
                       sweep_s=summary.get("seconds"))
        if error:
            row["error"] = f"{name}: {error}"
            return
    exported = yaml.safe_load(export.read_text())
    row["winner"] = exported["sweep"].get("starting_point") or _sampled(exported["config"], load_space(space))
    row["val_objective"] = exported["objective"]["value"]
    # The whole exported config and best epoch in the rows file: the scratch folder rarely outlives
    # the run, and a retraining that scores far from its recipe's `train` runs is checked against it.
    row["exported"] = {"config": exported["config"], "best_epoch": exported["best_epoch"]}
    metrics = json.loads((model / "metrics.json").read_text())
    score(row, metrics["test"], lambda classes: load_model(model, device=_cpu())[0], data, block)


def _cpu():
    import torch

    return torch.device("cpu")


def _sampled(config: dict, space) -> str:
    """The parameters the space sampled for this config (those of its branch), as `key=value, ...`."""
    sampled: dict = {}
    for p in space.params:
        if p.name in config and p.active(sampled):
            sampled[p.name] = config[p.name]
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sampled.items())


# ---- one dataset and split seed --------------------------------------------------------------------

def prepare_data(dataset: str, seed: int, image_size: int, block: Path) -> tuple[Path, float, str | None]:
    """The prepared folder for (dataset, seed): prepared here unless already there, or as given."""
    if dataset not in DATASETS:
        return Path(dataset), 0.0, None if (Path(dataset) / "meta.json").is_file() else f"{dataset}: no meta.json"
    data = block / "data"
    if (data / "meta.json").is_file():
        return data, 0.0, None
    if dataset == "synthetic":  # as `search` without --data prepares it, with this seed and size
        args = ["prepare", str(block / "synthetic-voc"), "--format", "synthetic"]
    elif dataset == "elpv":  # the images come with the installed `elpv` extra
        args = ["prepare", "--format", "elpv"]
    elif (NEU_DET / "Annotations").is_dir():
        args = ["prepare", str(NEU_DET), "--format", "voc", *(["--long-tail", "50"] if dataset == "neu-lt50" else [])]
    else:
        return data, 0.0, f"NEU-DET not found at {NEU_DET}"
    args += ["--out", str(data), "--image-size", str(image_size), "--seed", str(seed), "--overwrite"]
    wall, error = call(args, block / "prepare.log")
    return data, wall, error


def run_block(dataset: str, seed: int, args, space_path: Path, use_budget: bool, gpu: list[str], write) -> None:
    label = f"{DATASETS[dataset]}, {args.image_size} px" if dataset in DATASETS else f"{dataset} (as prepared)"
    block = args.work / f"{Path(dataset).name if dataset not in DATASETS else dataset}-s{seed}"
    block.mkdir(parents=True, exist_ok=True)
    print(f"== {label}, split seed {seed}: {block}", flush=True)
    data, wall, error = prepare_data(dataset, seed, args.image_size, block)
    meta = json.loads((data / "meta.json").read_text()) if error is None else {}
    write({"row": "data", "dataset": dataset, "label": label, "seed": seed, "dir": str(data), "prepare_s": wall,
           "error": error,
           "images": {s: v["images"] for s, v in meta.get("splits", {}).items()},
           "test_positives": meta.get("splits", {}).get("test", {}).get("positives")})
    # A prepared folder's split is fixed, so there the split seed varies the training instead.
    offset = 0 if dataset in DATASETS else 1000 * seed

    space = load_space(space_path)
    points = [(name, params) for name, params in space.points if name not in RECIPE_POINTS]  # those are (a) and (a')
    first: dict[str, dict] = {}  # (a) and (a') at the first training seed: their walls size the sweep
    for train_seed in args.train_seeds:
        keys = [*args.keys, f"seed={offset + train_seed}"]
        models = [("a", "scratch", ["--recipe", "scratch"], None), ("a'", "transfer", ["--recipe", "transfer"], None),
                  *(("b", name, [], space.config_for(params)) for name, params in points)]
        for arm, config, options, train_config in models:
            row = new_row(dataset, label, seed, arm, config, train_seed)
            if error:
                row["error"] = f"no data: {error}"
            else:
                attempt(row, train_model, data, block, options, keys, train_config)
            if args.keys:
                row["notes"].append(f"--keys {' '.join(args.keys)}: not the recipe as shipped")
            first.setdefault(arm, row)
            write(row)

    row = new_row(dataset, label, seed, "c", "sweep")
    timed = [r for r in (first.get("a"), first.get("a'")) if r and not r["error"] and r["wall_s"] is not None]
    if error:
        row["error"] = f"no data: {error}"
    elif not timed:
        row["error"] = "no time budget: (a) and (a'), whose wall time sizes it, both failed"
    else:
        slower = max(timed, key=lambda r: r["wall_s"])
        row["budget_from"] = slower["config"]
        if len(timed) < 2:
            row["notes"].append(f"budget from {slower['config']} alone: the other single recipe failed")
        attempt(row, sweep_model, data, block, space_path, seed, args.budget_factor * slower["wall_s"], use_budget,
                args.num_samples, None if dataset in DATASETS else offset, gpu)
        if not use_budget:
            row["notes"].append("no time budget applied: this `defect-tune search` has no --time-budget")
    write(row)


# ---- comparing the models ---------------------------------------------------------------------------------

def _ok(row: dict | None) -> bool:
    return row is not None and row["status"] == "ok" and row["test_ap"] is not None


def _name(key: tuple[str, str]) -> str:
    arm, config = key
    return ARMS[arm] if arm in ARMS and config in ("scratch", "transfer", "sweep") else f"({arm}) {config}"


def compare(configs: list[dict], data: dict[int, dict], train_seeds: list[int] | None) -> dict:
    """Per model (arm, config) and split seed, the test macro AP averaged over training seeds
    (only where every training seed was scored); the split seeds (c) was scored on; the best single
    recipe over those; (c) minus each single recipe with its paired interval."""
    keys = list(dict.fromkeys((r["arm"], r["config"]) for r in configs))
    rows: dict[tuple, dict[int, list[dict]]] = {k: {} for k in keys}
    for r in configs:
        rows[(r["arm"], r["config"])].setdefault(r["seed"], []).append(r)
    values: dict[tuple, dict[int, float]] = {k: {} for k in keys}
    for key, by_seed in rows.items():
        for seed, scored in by_seed.items():
            seeds_run = {r.get("train_seed") for r in scored}
            complete = key[0] == "c" or train_seeds is None or set(train_seeds) <= seeds_run
            if complete and all(_ok(r) for r in scored):
                values[key][seed] = statistics.mean(r["test_ap"] for r in scored)
    sweep = values.get(("c", "sweep"), {})
    compared = sorted(sweep)
    singles = [k for k in keys if k[0] != "c"]
    complete = [k for k in singles if compared and all(s in values[k] for s in compared)]
    means = {k: statistics.mean(values[k][s] for s in compared) for k in complete}
    intervals = {k: _interval(rows[k], rows.get(("c", "sweep"), {}), data, compared) for k in complete}
    best = max(complete, key=lambda k: means[k]) if complete else None
    return {"keys": keys, "rows": rows, "values": values, "compared": compared, "means": means, "best": best,
            "incomplete": [k for k in singles if k not in complete], "intervals": intervals,
            "sweep_mean": statistics.mean(sweep[s] for s in compared) if compared else None}


def _interval(model: dict[int, list[dict]], sweep: dict[int, list[dict]], data: dict[int, dict],
              seeds: list[int]) -> list[float] | None:
    """The paired interval of the mean over `seeds` of (c) minus `model` (mean over its training
    seeds), from the probabilities `score` kept; None when some are missing (a --render-only
    without the scratch folder)."""
    pairs = []
    for seed in seeds:
        if seed not in data:
            return None
        block = Path(data[seed]["dir"]).parent
        try:
            ours = np.load(probs_file(block, sweep[seed][0].get("name", "sweep")))
            others = [np.load(probs_file(block, r.get("name", r["config"])))["probs"] for r in model[seed]]
        except FileNotFoundError:
            return None
        pairs.append((ours["probs"], others, ours["targets"]))
    return paired_mean_interval(pairs) if pairs else None


def verdict(dataset: str, label: str, comparison: dict) -> dict:
    """Issue 29's goals on one set: None where they cannot be decided (no (c), or a single recipe
    missing on a compared split seed while (c) is not already below another)."""
    best, sweep_mean = comparison["best"], comparison["sweep_mean"]
    diff = None if best is None else sweep_mean - comparison["means"][best]
    interval = comparison["intervals"].get(best)
    undecided = best is None or bool(comparison["incomplete"])
    goal1 = None if diff is None else False if diff < 0 else None if undecided else True
    goal2 = None if undecided or interval is None else interval[0] > 0
    winners = [r[0].get("winner") for r in comparison["rows"].get(("c", "sweep"), {}).values() if _ok(r[0])]
    points = {r for (arm, r) in comparison["keys"] if arm != "c"}
    picks = {}
    for winner in winners:
        name = winner if winner in points or winner in RECIPE_POINTS else "a sampled config"
        picks[name] = picks.get(name, 0) + 1
    return {"dataset": dataset, "label": label, "real": dataset in REAL, "seeds": comparison["compared"], "diff": diff,
            "interval": interval, "best": best, "goal1": goal1, "goal2": goal2, "sweep_mean": sweep_mean,
            "best_mean": comparison["means"].get(best), "incomplete": comparison["incomplete"],
            "picks": ", ".join(f"{k} on {v} of {len(winners)}" for k, v in picks.items()) or "n/a"}


def overall(verdicts: list[dict], smoke: bool) -> str:
    """The one-sentence verdict over the real sets."""
    real = {v["dataset"]: v for v in verdicts if v["real"]}
    missing = [DATASETS[d] for d in REAL if d not in real]
    named = {d: DATASETS[d] for d in real}
    below = [v for v in real.values() if v["goal1"] is False]
    open1 = [named[d] for d, v in real.items() if v["goal1"] is None] + missing
    if below:
        goal1 = "not met (below the best single recipe on " + ", ".join(
            f"{named[v['dataset']]}: {v['diff']:+.3f} against {_name(v['best'])}" for v in below) + ")"
    elif open1:
        goal1 = "undetermined (not run or not complete: " + ", ".join(open1) + ")"
    else:
        goal1 = "met (at least the best single recipe on every real set)"
    above = [named[d] for d, v in real.items() if v["goal2"]]
    open2 = [named[d] for d, v in real.items() if v["goal2"] is None] + missing
    if above:
        goal2 = "met (the paired interval lies above 0 on " + ", ".join(above) + ")"
    elif open2:
        goal2 = "undetermined (not run, not complete or no interval: " + ", ".join(open2) + ")"
    else:
        goal2 = "not met (on no real set does the paired interval of (c) - best single recipe lie above 0)"
    return (f"**Verdict{' (smoke run: this measures nothing)' if smoke else ''}: Goal 1 is {goal1}; "
            f"Goal 2 is {goal2}.**")


# ---- the Markdown ---------------------------------------------------------------------------------------

def _fmt(value, interval=None, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.3f}" if sign else f"{value:.3f}"
    return text + (f" ({interval[0]:+.2f} to {interval[1]:+.2f})" if interval and sign else
                   f" ({interval[0]:.2f} to {interval[1]:.2f})" if interval else "")


def _wall(seconds) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def render(rows: list[dict]) -> list[str]:
    runs = [r for r in rows if r["row"] == "run"]
    run, end = (runs or [{}])[0], next((r for r in rows if r["row"] == "end"), None)
    settings = run.get("settings", {})
    smoke = bool(settings.get("keys"))
    if settings.get("num_samples"):
        trials = f"at most {settings['num_samples']}"
    elif settings.get("time_budget_option", True):
        trials = "as many as start before the budget runs out"
    else:
        trials = "the space's num_samples (no --time-budget in this `search`)"
    lines = ["# Quality: does the README flow train a better model than the best single recipe?", "",
             run.get("machine", "Machine: not recorded."), "",
             # Rows of several runs appended into one file render together: each run's command is listed.
             *(f"Command: `{r.get('command', 'not recorded')}` (started {r.get('started', '?')})" for r in runs), "",
             f"Started {run.get('started', '?')}; "
             + (f"the whole run took {_wall(end['run_s'])} (finished {end.get('finished', '?')})"
                if end and len(runs) == 1 else
                "several runs' rows, listed above; see each one's rows for its times" if end
                else "not finished when this was written (or killed)")
             + f"; rows in `{settings.get('rows', '?')}`, scratch in `{settings.get('work', '?')}`.", "",
             f"Settings: space `{settings.get('space')}`, image size {settings.get('image_size')} px, split seeds "
             f"{settings.get('seeds')}, training seeds {settings.get('train_seeds')} for (a), (a') and (b); time "
             f"budget of the sweep = {settings.get('budget_factor')} x the wall time of the slower of (a) and (a') on "
             f"the same data at the first training seed; trials: {trials}"
             + (f"; keys for (a), (a'), (b): {' '.join(settings['keys'])}" if smoke else "") + ".", "",
             *seed_lines(settings), "",
             "(a) `train --recipe scratch`; (a') `train --recipe transfer` (ImageNet weights); (b) each other point of "
             "the space's points_to_evaluate, by `train --config` at the space's fixed values and max_epochs; (c) the "
             "README flow, `search --time-budget`, `export`, `retrain --holdout val`. All learn their thresholds on "
             "validation and are scored once on the test split. Test macro AP is threshold-free; test macro recall is "
             "at the validation thresholds (recall_at_precision, precision floor 0.5). Intervals: 95 % percentile "
             f"bootstrap over test images ({BOOTSTRAP_SAMPLES} draws), AP's from each model's test probabilities "
             "recomputed from its saved weights. (c) - a single recipe: per split seed, (c)'s AP minus the mean of the "
             "recipe's training seeds' APs on the same draw of test images, averaged over the split seeds (c) was "
             "scored on. A class with no positive test image in a draw is left out of that draw's mean (as `evaluate` "
             "does), so where a class has 1-2 test positives an interval need not be centred on its point value. Wall: "
             "the model's commands end to end (for (c): search + export + retrain). Each model's exact commands are "
             "its row's `command` in the rows file.", ""]
    if smoke:
        lines += [f"**Smoke run:** the single recipes ran with `{' '.join(settings['keys'])}`; these figures measure "
                  "nothing.", ""]
    verdicts = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows if r["row"] in ("data", "config")):
        lines += dataset_section([r for r in rows if r.get("dataset") == dataset], settings.get("train_seeds"),
                                 verdicts)
    lines += verdict_section(verdicts, smoke)
    if any(not r.get("budget_applied", True) for r in rows if r["row"] == "config" and r["arm"] == "c"):
        lines += ["", "Some sweeps ran without a time budget (`search` had no `--time-budget` then): their trial count "
                  "was the space's, not the budget's."]
    return lines


def seed_lines(settings: dict) -> list[str]:
    """Which split seeds each set ran, and the cut that chose them."""
    by_dataset = settings.get("seeds_by_dataset") or {}
    ran = "; ".join(f"{DATASETS.get(d, d)}: {s}" for d, s in by_dataset.items())
    if settings.get("full"):
        return [f"Split seeds run: {ran} (`--full`: every dataset on every split seed)."]
    if any(len(s) < len(settings.get("seeds", [])) for s in by_dataset.values()):
        return [f"**Cut:** split seeds run: {ran} (`--max-seeds {settings.get('max_seeds')}`: the first split seeds "
                "of each set, so that the default run takes about two hours on 2 cores, an estimate from epoch "
                "times (see the script's docstring)). `--full` runs every dataset on every split seed."]
    return [f"Split seeds run: {ran}."] if ran else []


def dataset_section(rows: list[dict], train_seeds: list[int] | None, verdicts: list[dict]) -> list[str]:
    configs = [r for r in rows if r["row"] == "config"]
    data = {r["seed"]: r for r in rows if r["row"] == "data"}
    dataset, label = (configs or list(data.values()))[0]["dataset"], (configs or list(data.values()))[0]["label"]
    lines = [f"## {label}{'' if dataset in REAL else ' (outside the verdict)'}", ""]
    for seed, d in data.items():
        positives = ", ".join(f"{k} {v}" for k, v in (d.get("test_positives") or {}).items())
        images = " / ".join(f"{v} {k}" for k, v in d["images"].items()) or "not prepared"
        lines.append(f"- split seed {seed}: images {images}; test positives: {positives or 'n/a'}"
                     + (f"; no data: {d['error']}" if d.get("error") else ""))
    comparison = compare(configs, data, train_seeds)
    lines += ["", "| split seed | model | training seed | test macro AP (95 % CI) | "
              "test macro recall at val thresholds (95 % CI) | test macro precision | best / run epochs | "
              "wall | notes |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for seed in sorted({r["seed"] for r in configs}):
        for key in comparison["keys"]:
            scored = comparison["rows"][key].get(seed, [])
            for r in sorted(scored, key=lambda r: r.get("train_seed") or 0):
                epochs = f"{r['best_epoch']} / {r['epochs_run']}" if r.get("epochs_run") is not None else ""
                lines.append(f"| {seed} | {_name(key)} | {'' if r.get('train_seed') is None else r['train_seed']} | "
                             f"{_fmt(r['test_ap'], r['test_ap_interval'])} | "
                             f"{_fmt(r['test_recall'], r['test_recall_interval'])} | {_fmt(r['test_precision'])} | "
                             f"{epochs} | {_wall(r['wall_s'])} | {_notes(r)} |")
            if len(scored) > 1:  # the mean over training seeds, where every one was scored
                value = comparison["values"][key].get(seed)
                recall, precision = ([_fmt(_mean([r[k] for r in scored])) for k in ("test_recall", "test_precision")]
                                     if value is not None else ["n/a", "n/a"])
                lines.append(f"| {seed} | {_name(key)} | mean | {_fmt(value)} | {recall} | {precision} | | "
                             f"{_wall(_mean([r['wall_s'] for r in scored]))} | |")
    lines += ["", *comparison_table(comparison)]
    verdicts.append(verdict(dataset, label, comparison))
    return lines + [""]


def _notes(r: dict) -> str:
    notes = list(r["notes"])
    if r["arm"] == "c":
        if r.get("winner"):
            notes.insert(0, f"winner: {r['winner']} (val objective {_fmt(r.get('val_objective'))})")
        if r.get("trials") is not None:
            reasons = ", ".join(f"{k} {v}" for k, v in (r.get("stop_reasons") or {}).items())
            notes.insert(1, f"{r['trials']} trial{'' if r['trials'] == 1 else 's'} ({reasons}); "
                         f"budget {_wall(r.get('budget_s'))}"
                         f"{' from ' + r['budget_from'] if r.get('budget_from') else ''}; "
                         + "; ".join(f"{k} {_wall(v)}" for k, v in r.get("step_s", {}).items()))
    if r["error"]:
        notes.insert(0, f"**failed**: {r['error']}")
    return "; ".join(n.replace("|", "/") for n in notes)


def comparison_table(comparison: dict) -> list[str]:
    """Per model: each split seed's AP (the mean over training seeds, each training seed's after it),
    the mean over the split seeds (c) was scored on, and (c) minus it."""
    seeds = sorted({s for by_seed in comparison["rows"].values() for s in by_seed})
    compared = comparison["compared"]
    lines = ["| model | " + " | ".join(f"split seed {s}" for s in seeds)
             + f" | mean over split seeds {compared or 'n/a'} | (c) - model (95 % paired CI) | mean wall |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for key in comparison["keys"]:
        cells = []
        for s in seeds:
            scored = comparison["rows"][key].get(s, [])
            value = comparison["values"][key].get(s)
            each = ", ".join(_fmt(r["test_ap"]) for r in sorted(scored, key=lambda r: r.get("train_seed") or 0))
            cells.append("" if not scored else _fmt(value) + (f" ({each})" if len(scored) > 1 or value is None else ""))
        mean = comparison["sweep_mean"] if key[0] == "c" else comparison["means"].get(key)
        diff = None if key[0] == "c" or mean is None else comparison["sweep_mean"] - mean
        name = _name(key) + (" **best single**" if key == comparison["best"] else "")
        walls = [r["wall_s"] for by_seed in comparison["rows"][key].values() for r in by_seed]
        lines.append(f"| {name} | {' | '.join(cells)} | {_fmt(mean)} | "
                     f"{_fmt(diff, comparison['intervals'].get(key), sign=True) if key[0] != 'c' else ''} | "
                     f"{_wall(_mean(walls))} |")
    if comparison["incomplete"]:
        lines += ["", "Not scored on every training seed of every split seed (c) was scored on, so out of the "
                  "comparison: " + ", ".join(_name(k) for k in comparison["incomplete"]) + "."]
    return lines


def verdict_section(verdicts: list[dict], smoke: bool) -> list[str]:
    yes = {True: "yes", False: "no", None: "n/a"}
    lines = ["## Verdict", "",
             "Over the real sets (NEU-DET, NEU-DET long-tail 50, ELPV); best single = the best of (a), (a') and each "
             "(b) by mean test macro AP over the split seeds. Goal 1: (c) >= best single on every real set. Goal 2: on "
             "at least one real set the paired 95 % interval of (c) - best single lies above 0.", "",
             "| dataset | split seeds | (c) mean test macro AP | best single (mean) | "
             "(c) - best single (95 % paired CI) | Goal 1: (c) >= best | Goal 2: interval above 0 | sweep's picks |",
             "|---|---|---:|---|---:|---|---|---|"]
    for v in verdicts:
        best = f"{_name(v['best'])} ({_fmt(v['best_mean'])})" if v["best"] else "n/a"
        if v["incomplete"]:
            best += "; not compared: " + ", ".join(_name(k) for k in v["incomplete"])
        lines.append(f"| {v['label']}{'' if v['real'] else ' (outside the verdict)'} | {v['seeds'] or 'none'} | "
                     f"{_fmt(v['sweep_mean'])} | {best} | {_fmt(v['diff'], v['interval'], sign=True)} | "
                     f"{yes[v['goal1']]} | {yes[v['goal2']]} | {v['picks']} |")
    return lines + ["", overall(verdicts, smoke)]


# ---- main -------------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def seeds_by_dataset(datasets: list[str], seeds: list[int], max_seeds: str, full: bool) -> dict[str, list[int]]:
    """The split seeds each dataset runs: all with --full, else the first `max_seeds` allows (a set it
    does not name runs all)."""
    caps = {}
    for item in (max_seeds or "").split(","):
        if item.strip():
            name, _, count = item.partition("=")
            caps[name.strip()] = int(count)
    return {d: seeds if full or d not in caps else seeds[:caps[d]] for d in datasets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(REAL),
                        help=f"comma-separated, of {', '.join(DATASETS)} (synthetic: outside the verdict); '' for none")
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help="an extra prepared folder, outside the verdict (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="split seeds, comma-separated")
    parser.add_argument("--train-seeds", default="0,1", help="training seeds of (a), (a') and (b), comma-separated")
    parser.add_argument("--max-seeds", default=DEFAULT_MAX_SEEDS, metavar="SET=N,...",
                        help="run only the first N split seeds of SET (the default keeps the run to about two hours "
                             "on 2 cores, an estimate); sets not named run every split seed")
    parser.add_argument("--full", action="store_true", help="every dataset on every split seed (for a GPU)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--space", default="defects", help="a bundled space by name, or a YAML path")
    parser.add_argument("--budget-factor", type=float, default=3.0,
                        help="the sweep's time budget over the slower single recipe's wall time")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="cap on the sweep's trials (default: as many as start within the time budget)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one under /tmp)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/quality.md"))
    parser.add_argument("--rows", type=Path, default=None, help="the raw rows, JSON lines (default: --out with .jsonl)")
    parser.add_argument("--keys", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every single recipe's train (smoke runs)")
    parser.add_argument("--render-only", action="store_true", help="write --out from --rows alone; run nothing")
    args = parser.parse_args()
    rows_file = args.rows or args.out.with_suffix(".jsonl")
    if args.render_only:
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.startswith("{")]
        emit(render(rows), args.out)
        return

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; choose from {', '.join(DATASETS)}")
    datasets += [str(d.absolute()) for d in args.data]
    seeds, args.train_seeds = _ints(args.seeds), _ints(args.train_seeds)
    if not seeds or not args.train_seeds:
        parser.error("--seeds and --train-seeds need at least one seed each")
    try:
        plan = seeds_by_dataset(datasets, seeds, args.max_seeds, args.full)
    except ValueError:
        parser.error(f"--max-seeds: expected SET=N,..., got {args.max_seeds!r}")
    space_path = resolve_space(args.space).absolute()
    load_space(space_path)  # a broken space fails here, not after the first training
    if not cli_has("train", "--recipe"):
        sys.exit("`defect-tune train` has no --recipe here: (a) and (a') need `train --recipe scratch|transfer`")
    use_budget = cli_has("search", "--time-budget")
    if not use_budget:
        print("warning: `defect-tune search` has no --time-budget; sweeps run the space's trial budget instead",
              flush=True)
    gpu = gpu_options()
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="dt-quality-"))).absolute()

    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def write(row: dict) -> None:
        rows.append(row)
        with open(rows_file, "a") as out:
            out.write(json.dumps(row) + "\n")
        if row["row"] == "config":
            print(json.dumps({k: row.get(k) for k in ("dataset", "seed", "config", "train_seed", "status", "test_ap",
                                                     "test_recall", "wall_s", "error")}), flush=True)

    rows_file.write_text("")
    started = time.perf_counter()
    write({"row": "run", "command": shlex.join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]]),
           "machine": machine_details(), "started": time.strftime("%Y-%m-%d %H:%M"),
           "settings": {"datasets": datasets, "seeds": seeds, "train_seeds": args.train_seeds, "seeds_by_dataset": plan,
                        "max_seeds": args.max_seeds, "full": args.full, "image_size": args.image_size,
                        "space": space_name(resolve_space(args.space)), "budget_factor": args.budget_factor,
                        "num_samples": args.num_samples,
                        "keys": args.keys, "gpu_options": gpu, "work": str(args.work), "rows": str(rows_file),
                        "time_budget_option": use_budget}})
    for seed in seeds:  # every dataset once before any twice: a run cut short still covers them all
        for dataset in datasets:
            if seed in plan[dataset]:
                run_block(dataset, seed, args, space_path, use_budget, gpu, write)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text("\n".join(render(rows)) + "\n")  # a killed run leaves the tables so far
    write({"row": "end", "run_s": time.perf_counter() - started, "finished": time.strftime("%Y-%m-%d %H:%M")})
    emit(render(rows), args.out)


if __name__ == "__main__":
    main()
