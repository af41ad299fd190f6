"""`defect-tune retrain`: an exported configuration trained once more, for production, as one
TorchTrainer run (locally or on a cluster), written out as a model directory.

Two ways, the user's choice (`holdout`):
- `val` (default): train on train, keep validation to pick the best epoch and learn the
  per-class thresholds on this model's own outputs. Thresholds learned on another model (the
  sweep's) do not fit a retrained one; calibrated thresholds are worth more on small defect sets
  than the extra 15% of images.
- `none`: train on train+val for the epoch at which the sweep's trial scored best (on the same
  learning-rate schedule), and use the thresholds exported from the sweep. The default after a
  cross-validated sweep (`search --cv`): its best epoch is the one the folds agreed on (best
  fold-mean) and its thresholds the fold-averaged ones, so validation has nothing left to add.
Either way the test split is untouched until the end, and its metrics go into the model card.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import ray
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console

from defect_tune.core.class_stats import ClassCounts
from defect_tune.core.config import OBJECTIVE, OBJECTIVE_DEFINITION, SELECTION, TrainConfig, validate_config
from defect_tune.core.errors import UserError, check_writable
from defect_tune.core.metrics import evaluate, guarded_macro_recall
from defect_tune.core.versions import package_versions
from defect_tune.data.shards import MEAN, STD, check_shards, data_location, load_split, read_meta
from defect_tune.production.export import read_export
from defect_tune.production.model_dir import MODEL_JSON, format_figure, write_model_dir
from defect_tune.production.onnx_model import ONNX_FILE, PARITY_TOLERANCE, OnnxModel, cpu_latencies, export_onnx, parity
from defect_tune.raytrain.cluster import gpus_per_worker, start_ray
from defect_tune.raytrain.errors import error_reason
from defect_tune.raytrain.ingest import build_datasets, data_tasks_at_once
from defect_tune.raytrain.loop import dataset_config, keeps_train, train_loop_per_worker
from defect_tune.raytrain.loop_config import KEEP_TRAIN_GB, LoopConfig, check_gpu_share
from defect_tune.raytrain.worker import CHECKPOINT_FILE
from defect_tune.training.engine import build_parts, pick_device, predict
from defect_tune.training.models import resolve_weights
from defect_tune.training.train import make_loader

HOLDOUTS = ("val", "none")


class RetrainError(UserError):
    """A retraining that cannot start or finish; the message says why."""


@dataclass(frozen=True)
class RetrainOptions:
    export: Path
    data: Path | str  # a path, or a URI (s3://, gs://, file://)
    out: Path
    holdout: str | None = None  # default: "none" after a cross-validated sweep, else "val"
    address: str | None = None  # None: a local Ray cluster
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | str = "auto"  # auto: one per worker when the cluster has GPUs
    storage: str | None = None  # Train's checkpoints; a shared path or URI on a multi-node cluster
    seed: int | None = None  # default: the exported config's
    overwrite: bool = False


def check_mlflow(tracking_uri: str | None, register: str | None) -> None:
    """Before hours of retraining, not after: `register` needs a tracking URI, and a URI needs
    MLflow (found without importing it: `production.registry` does, when it logs)."""
    if register is not None and tracking_uri is None:
        raise RetrainError(f"--register {register}: registering needs --mlflow URI")
    if tracking_uri is not None and importlib.util.find_spec("mlflow") is None:
        raise RetrainError("--mlflow needs MLflow: pip install -e '.[mlflow]'")


def _check(options: RetrainOptions, export: dict, meta: dict) -> None:
    if options.holdout not in HOLDOUTS:
        raise RetrainError(f"--holdout {options.holdout!r}: choose one of {', '.join(HOLDOUTS)}")
    try:
        check_gpu_share(options.gpus_per_worker)
    except ValueError as error:
        raise RetrainError(f"--gpus-per-worker {error}") from None
    if meta["classes"] != export["data"]["classes"]:
        raise RetrainError(
            f"{options.data}/meta.json: classes {meta['classes']} differ from the export's "
            f"{export['data']['classes']}; "
            "the thresholds and the head are per class, so retrain on data prepared with the same classes (--classes)"
        )
    if options.holdout == "val" and not meta["splits"]["val"]["images"]:
        raise RetrainError(f"{options.data}: --holdout val needs a validation split, and it is empty")
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        if not options.overwrite:
            raise RetrainError(f"{out}: exists and is not empty; --overwrite replaces it")
        if not (out / MODEL_JSON).is_file():
            raise RetrainError(f"{out}: --overwrite only replaces a model directory (no {MODEL_JSON} there)")
    check_writable(out, "--out")


def _fit(options: RetrainOptions, config: TrainConfig, meta: dict, stop_after: int, validate: bool, storage: str):
    train_splits = ("train",) if validate else ("train", "val")
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if use_gpu else {})}
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the same rows in the same order, every run
    context.enable_progress_bars = False  # per-dataset bars every epoch drown the log
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=LoopConfig(config=config.model_dump(), meta=meta, stop_after=stop_after, validate=validate,
                                     reproducible=True, train_splits=tuple(train_splits),
                                     keep_train=keeps_train(meta, options.workers, KEEP_TRAIN_GB * 2**30, train_splits),
                                     ).as_dict(),
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=build_datasets(data_location(options.data), meta, config, train_splits, validate, reproducible=True,
                                tasks_at_once=data_tasks_at_once(options.workers, options.cpus_per_worker)),
        dataset_config=dataset_config(options.workers),
        run_config=RunConfig(
            name=f"retrain-{datetime.now(UTC):%Y%m%d-%H%M%S}", storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SELECTION,
                                               checkpoint_score_order="max")
            if validate else CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RetrainError(f"training failed: {error_reason(result.error)}")
    if validate:
        checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1][SELECTION])
    else:
        checkpoint, metrics = result.checkpoint, result.metrics
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state, metrics, result.path, int(result.metrics["epoch"])


def _onnx(model, meta: dict, test_x: np.ndarray, path: Path, console: Console) -> tuple[dict, dict]:
    """model.onnx at `path`, checked against PyTorch on the test images, and both runtimes' CPU
    latencies. A model the exporter cannot write, or whose ONNX graph disagrees, still ships as
    safetensors: its model.json says why there is no model.onnx (training is not thrown away)."""
    height, width = meta["image"]["height"], meta["image"]["width"]
    try:
        info = export_onnx(model, height, width, path, meta["classes"])
        onnx = OnnxModel(path)
    except Exception as error:  # noqa: BLE001 - any exporter failure: the weights still ship
        reason = f"the ONNX exporter failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        console.print(f"warning: no model.onnx: {reason}", style="yellow", highlight=False, markup=False,
                      soft_wrap=True)
        return {"error": reason}, {}
    worst = parity(model, onnx, test_x)
    info["parity"] = {"split": "test", "images": len(test_x), "max_abs_difference": worst,
                      "tolerance": PARITY_TOLERANCE}
    if not worst <= PARITY_TOLERANCE:
        reason = f"onnxruntime's test probabilities differ from PyTorch's by {worst:.2g}, above {PARITY_TOLERANCE:g}"
        console.print(f"warning: no model.onnx: {reason}", style="yellow", highlight=False, markup=False,
                      soft_wrap=True)
        return {"error": reason, "parity": info["parity"]}, {}
    return info, cpu_latencies(model, onnx, height, width)


def _plan(options: RetrainOptions, export: dict, meta: dict, console: Console) -> tuple[RetrainOptions, TrainConfig]:
    """Everything checked before Ray starts (the export against the data, the shards, the config,
    the backbone's weights), and one line saying what will be trained on what."""
    if options.holdout is None:
        options = replace(options, holdout="none" if export.get("cv") else "val")
    _check(options, export, meta)
    check_shards(options.data, meta)
    values = dict(export["config"])
    if options.seed is not None:
        values["seed"] = options.seed
    config = validate_config(values, f"{options.export}: config")  # a hand-edited export names itself
    validate = options.holdout == "val"
    stop_after = config.epochs if validate else int(export["best_epoch"])
    if meta.get("source_fingerprint") != export["data"].get("source_fingerprint"):
        console.print(f"note: {options.data} is not the data the sweep ran on (fingerprints differ); "
                      "retraining on it anyway",
                      highlight=False, markup=False)
    plan = (f"train on train for up to {stop_after} epochs, best epoch and thresholds from val" if validate else
            f"train on train+val for {stop_after} epochs (the sweep's best epoch"
            f"{', where the folds agreed' if export.get('cv') else ''}), the sweep's thresholds")
    console.print(f"retrain {export['sweep']['name']} trial {export['sweep']['trial_id']}: {plan}; seed {config.seed}",
                  highlight=False, markup=False)
    weights = resolve_weights(config)  # a backbone without its weights here stops before Ray starts
    if weights is not None:
        console.print(weights.describe(), highlight=False, markup=False, soft_wrap=True)
    return options, config


def _train_on_ray(options: RetrainOptions, config: TrainConfig, meta: dict, stop_after: int, validate: bool,
                  console: Console):
    """One TorchTrainer run on the cluster (a local one unless --address): (the options with the
    GPU share resolved, state, metrics, the run's path, epochs run). Checkpoints go to a scratch
    folder unless --storage."""
    with tempfile.TemporaryDirectory(prefix="defect-tune-retrain-") as scratch:
        storage = options.storage or str(Path(scratch) / "train")
        if options.address is not None and options.storage is None:
            console.print("note: on a multi-node cluster pass --storage (a shared path or URI) so the driver can read "
                          "the workers' checkpoints", highlight=False, markup=False)
        connected = ray.is_initialized()  # a caller's Ray session is used as it is, and left running
        if not connected:
            start_ray(options.address, configure_logging=False)  # its ClusterError is one line at the CLI
        try:
            options = replace(options,
                              gpus_per_worker=gpus_per_worker(options.gpus_per_worker, ray.cluster_resources()))
            if options.gpus_per_worker:
                console.print(f"training on {options.workers} worker(s) with {options.gpus_per_worker:g} GPU each "
                              "(--gpus-per-worker 0: CPUs only)", highlight=False, markup=False)
            return options, *_fit(options, config, meta, stop_after, validate, storage)
        finally:
            if not connected:
                ray.shutdown()


def retrain(options: RetrainOptions, console: Console | None = None) -> dict:
    """Train, calibrate, test and write OUT; return the model's metadata (OUT/model.json)."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    export = read_export(options.export)
    meta = read_meta(options.data)
    options, config = _plan(options, export, meta, console)
    classes = meta["classes"]
    validate = options.holdout == "val"
    stop_after = config.epochs if validate else int(export["best_epoch"])
    out = Path(options.out).absolute()
    options, state, metrics, run_path, epochs_run = _train_on_ray(options, config, meta, stop_after, validate, console)

    if validate:
        thresholds = np.array([metrics[f"threshold/{c}"] for c in classes], dtype=np.float64)
        best_epoch, source = int(state["best_epoch"]), "learned on val with the retrained model"
    else:
        thresholds = np.array([export["thresholds"][c] for c in classes], dtype=np.float64)
        best_epoch, source = stop_after, f"exported from sweep {export['sweep']['name']}"
        if export.get("cv"):
            source = (f"the mean of {export['cv']['folds']} folds' thresholds "
                      "(each learned on its fold's held-out part) "
                      f"in sweep {export['sweep']['name']}")

    # The untouched test split, scored on this machine with the weights that will ship.
    parts = build_parts(config.model_copy(update={"pretrained": False, "pretrained_path": None}), meta, 1,
                        pick_device())
    parts.model.load_state_dict(state["model"])
    test_x, test_y, _ = load_split(options.data, "test", meta)
    test_probs, test_targets, _ = predict(parts, make_loader(test_x, test_y, config))
    test_report = evaluate(test_probs, test_targets, classes, thresholds)
    val_report = None
    if validate:
        val_x, val_y, _ = load_split(options.data, "val", meta)
        val_probs, val_targets, _ = predict(parts, make_loader(val_x, val_y, config))
        val_report = evaluate(val_probs, val_targets, classes, thresholds)

    staging = Path(tempfile.mkdtemp(prefix="defect-tune-onnx-"))
    onnx_info, latency = _onnx(parts.model, meta, test_x, staging / ONNX_FILE, console)

    counts = ClassCounts.from_meta(meta, ("train",) if validate else ("train", "val"))
    info = {
        "format": 1,
        "classes": classes,
        "thresholds": dict(zip(classes, (float(t) for t in thresholds))),
        "thresholds_from": source,
        "preprocessing": {  # what `predict` must do to an image, the same as `prepare` did
            "image_size": meta["options"]["image_size"], "fit": meta["image"]["fit"],
            "height": meta["image"]["height"], "width": meta["image"]["width"], "grayscale": True,
            "mean": MEAN, "std": STD, "bit_depth": meta["image"].get("bit_depth"),
        },
        "training": {
            "holdout": options.holdout, "train_splits": ["train"] if validate else ["train", "val"],
            "epochs_trained": epochs_run, "best_epoch": best_epoch, "seed": config.seed,
            "workers": options.workers, "gpus_per_worker": options.gpus_per_worker,
            "train_run": run_path if options.storage else None,  # else a scratch folder, gone
            "train_positives": counts.positives,
        },
        "data": {"dir": str(options.data), "source_fingerprint": meta.get("source_fingerprint"),
                 "images": {split: meta["splits"][split]["images"] for split in ("train", "val", "test")}},
        "export": {"file": str(options.export), **export["sweep"],
                   "sweep_objective": export["objective"]["value"]},
        "objective": {"name": OBJECTIVE, "definition": OBJECTIVE_DEFINITION},
        "onnx": onnx_info,
        "latency_ms_per_image": latency,
        "versions": package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    metrics_out = {
        "test": test_report,
        "test_macro_recall": test_report["macro"]["recall"],
        "test_guarded_macro_recall": guarded_macro_recall(test_probs, test_targets, config.precision_floor),
        "val": val_report,
        "sweep_val_objective": export["objective"]["value"],
    }
    write_model_dir(out, parts.model, config, info, metrics_out,
                    {ONNX_FILE: staging / ONNX_FILE} if "error" not in onnx_info else {})
    shutil.rmtree(staging, ignore_errors=True)
    console.print(
        f"model: {out} (test macro recall {format_figure(metrics_out['test_macro_recall'])} at its thresholds, "
        f"{source}; "
        f"the sweep's validation objective was {format_figure(export['objective']['value'])})",
        highlight=False, markup=False, soft_wrap=True,
    )
    return info
