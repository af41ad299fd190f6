"""`defect-tune train`: one configuration trained in this process, no Ray, on `prepare`'s output.

The epochs themselves run in `engine.run_epochs`, the loop every driver shares; this module
gives it in-process batches (a DataLoader) and writes the run's results.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from defect_tune import __version__
from defect_tune.core.config import OBJECTIVE, OBJECTIVE_DEFINITION, TrainConfig
from defect_tune.core.errors import UserError, check_writable, file_in_the_way, files_not_written_by
from defect_tune.core.metrics import evaluate, guarded_macro_recall, learn_thresholds, per_class_table
from defect_tune.data.augment import augment_batch, build_augmentation
from defect_tune.data.shards import check_shards, data_location, load_split, read_meta, to_tensor
from defect_tune.training.engine import (
    EarlyStopping,
    Hooks,
    NonFiniteLoss,
    Progress,
    build_parts,
    draw_order,
    pick_device,
    predict,
    run_epochs,
    seed_everything,
    train_one_epoch,
)
from defect_tune.training.models import parameter_counts, resolve_weights

# Device memory a CUDA process holds outside torch's allocator: its context and the kernels
# loaded into it (lazily since CUDA 11.7). The process cannot see it without NVML, so this is an
# allowance, not a measurement; a GPU run should replace it with one.
CUDA_CONTEXT_BYTES = 2**29


def training_steps(config: TrainConfig, meta: dict, device: torch.device, steps: int = 3) -> dict:
    """`steps` training steps of `config` on random images of the data's size at its batch size,
    backbone trainable: what a worker's training asks of the device's memory, without the data.
    Returns the epoch's row and the model's `parameter_counts`."""
    parts = build_parts(config, meta, steps, device)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, 1, meta["image"]["height"], meta["image"]["width"])
    batches = [(torch.randn(shape, generator=generator),
                torch.randint(0, 2, (config.batch_size, len(meta["classes"])), generator=generator))
               for _ in range(steps)]
    row = train_one_epoch(parts, config, batches, config.freeze_epochs, np.random.default_rng(config.seed),
                          finish_on_nonfinite=True)
    return {**row, **parameter_counts(parts.model)}


def training_memory(config: TrainConfig, meta: dict, device: torch.device) -> int:
    """The device memory (bytes) a GPU worker training `config` takes at its peak: the allocator's
    peak over `training_steps`, plus `CUDA_CONTEXT_BYTES`."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    training_steps(config, meta, device)
    peak = torch.cuda.max_memory_reserved(device)
    torch.cuda.empty_cache()
    return peak + CUDA_CONTEXT_BYTES


class _Images(Dataset):
    """Stored uint8 images, augmented per item; collated to normalised tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pipeline):
        self.images, self.labels, self.pipeline = images, labels, pipeline

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.pipeline is not None:
            image = augment_batch(self.pipeline, image[None])[0]
        return image, self.labels[index]


def _collate(batch):
    images, labels = zip(*batch)
    return to_tensor(np.stack(images)), torch.from_numpy(np.stack(labels))


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    pipeline = info.dataset.pipeline
    if pipeline is not None:  # each worker its own augmentation stream, reproducible from the seed
        pipeline.set_random_seed(info.seed % 2**32)


class _DrawOrder(Sampler):
    """Each epoch's order from `engine.draw_order`, the one rule for which images an epoch sees."""

    def __init__(self, labels: np.ndarray, oversample_power: float, seed: int):
        self.labels, self.power, self.rng = labels, oversample_power, np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(draw_order(self.labels, self.power, self.rng).tolist())


def make_loader(images, labels, config: TrainConfig, pipeline=None, train: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    sampler = _DrawOrder(labels, config.oversample_power, config.seed) if train else None
    return DataLoader(
        _Images(images, labels, pipeline), batch_size=config.batch_size, sampler=sampler, collate_fn=_collate,
        num_workers=config.num_workers, worker_init_fn=_reseed_worker if config.num_workers else None,
        drop_last=train and len(labels) > config.batch_size, generator=generator,
    )


class LoaderHooks(Hooks):
    """`fit`'s side of the engine: DataLoader batches, every epoch's row kept in `history`, the
    best epoch's weights kept in memory (and in `best_path`)."""

    def __init__(self, train_loader: DataLoader, val_loader: DataLoader, parts, best_path: Path | None = None,
                 on_epoch=None, on_batch=None):
        self.train_loader, self.val_loader, self.parts = train_loader, val_loader, parts
        self.best_path, self.on_epoch, self.on_batch = best_path, on_epoch, on_batch
        self.history: list[dict] = []
        self.best_state: dict | None = None

    def train_batches(self, epoch: int):
        for batch in self.train_loader:
            yield batch
            if self.on_batch is not None:
                self.on_batch()

    def val_batches(self):
        return self.val_loader

    def end_epoch(self, row: dict, improved: bool, scored) -> None:
        self.history.append(row)
        if improved:
            self.best_state = copy.deepcopy(self.parts.model.state_dict())
            if self.best_path is not None:
                torch.save(self.best_state, self.best_path)
        if self.on_epoch is not None:
            self.on_epoch(row)


def load_checkpoint(path: Path, model: nn.Module) -> None:
    """Weights only: a checkpoint never runs code when loaded."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


# What `train` writes in --out; it writes again over an earlier train's output and nothing else.
TRAIN_OUTPUTS = frozenset({"config.yaml", "results.json", "best.pt", "per_class.txt"})


def check_train_out(out: Path) -> None:
    """Refuse an --out that is a file, or a folder holding anything train did not write (a
    retrained model directory, a prepare output): its files would be overwritten or mixed."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out is a file, not a folder")
    if (blocker := file_in_the_way(out)) is not None:
        raise UserError(f"{out}: --out lies under {blocker}, which is a file")
    others = files_not_written_by(out, TRAIN_OUTPUTS)
    if others:
        raise UserError(f"{out}: --out holds files train did not write ({', '.join(others[:5])}); choose a new folder")
    check_writable(out, "--out")


def fit(config: TrainConfig, data_dir: Path, out_dir: Path, device: str = "auto", on_epoch=None, on_batch=None) -> dict:
    """Train one configuration on `prepare`'s output, in this process; write OUT/results.json,
    OUT/per_class.txt, OUT/config.yaml and OUT/best.pt. A NaN/inf loss ends the run as failed."""
    started = time.perf_counter()
    meta = read_meta(data_dir)
    check_shards(data_dir, meta)  # before anything is written to OUT
    out_dir = Path(out_dir)
    check_train_out(out_dir)
    weights = resolve_weights(config)  # a backbone without its weights stops here, before OUT is written
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config.to_yaml())
    seed_everything(config.seed)
    classes = meta["classes"]
    train_x, train_y, _ = load_split(data_dir, "train", meta)
    val_x, val_y, _ = load_split(data_dir, "val", meta)
    test_x, test_y, _ = load_split(data_dir, "test", meta)
    pipeline = build_augmentation(config.augment, train_x.shape[1:], config.seed)
    train_loader = make_loader(train_x, train_y, config, pipeline, train=True)
    val_loader, test_loader = make_loader(val_x, val_y, config), make_loader(test_x, test_y, config)
    parts = build_parts(config, meta, len(train_loader), pick_device(device))
    rng = np.random.default_rng(config.seed)

    results = {
        "status": "running",
        "error": None,
        "config": config.model_dump(),
        "data": {"dir": data_location(data_dir), "source_fingerprint": meta.get("source_fingerprint"),
                 "classes": classes, "image": meta["image"]},
        "objective": {"name": OBJECTIVE, "mode": "max", "precision_floor": config.precision_floor,
                      "definition": OBJECTIVE_DEFINITION},
        "weights": weights.describe() if weights else "none: from scratch",
        "parameters": parameter_counts(parts.model),
        "device": str(parts.device),
        "versions": {"defect_tune": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "history": [],
    }
    stopper = EarlyStopping(config.early_stopping_patience)
    hooks = LoaderHooks(train_loader, val_loader, parts, out_dir / "best.pt", on_epoch, on_batch)
    results["history"] = hooks.history
    try:
        run_epochs(parts, config, classes, hooks, Progress(stopper), config.epochs, rng)
    except NonFiniteLoss as error:
        results.update(status="failed", error=str(error), seconds=round(time.perf_counter() - started, 3))
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
        raise

    parts.model.load_state_dict(hooks.best_state)  # early stopping restores the best epoch's weights
    probs, targets, _ = predict(parts, val_loader)
    thresholds = learn_thresholds(probs, targets, config.threshold_rule, config.precision_floor,
                                  config.threshold_method)
    val_report = evaluate(probs, targets, classes, thresholds)
    trivial = {"all_positive": np.ones_like(targets),
               "random": np.random.default_rng(config.seed).random(targets.shape)}
    baselines = {  # what the guard is for: these must score far below any trained model
        name: {OBJECTIVE: guarded_macro_recall(p, targets, config.precision_floor),
               "val_macro_recall@0.5": evaluate(p, targets, classes, 0.5)["macro"]["recall"]}
        for name, p in trivial.items()
    }
    test_probs, test_targets, _ = predict(parts, test_loader)
    test_report = evaluate(test_probs, test_targets, classes, thresholds)
    results.update(
        status="completed",
        best_epoch=stopper.best_epoch,
        best_objective=next(row[OBJECTIVE] for row in results["history"] if row["epoch"] == stopper.best_epoch),
        epochs_run=len(results["history"]),
        stopped_early=len(results["history"]) < config.epochs,
        baselines=baselines,
        thresholds=dict(zip(classes, (float(t) for t in thresholds))),
        val=val_report,
        test=test_report,
        seconds=round(time.perf_counter() - started, 3),
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = per_class_table(val_report, f"VALIDATION (epoch {stopper.best_epoch}, thresholds learned here)") + "\n"
    table += per_class_table(test_report, "TEST (thresholds from validation, unchanged)") + "\n"
    (out_dir / "per_class.txt").write_text(table)
    return results
