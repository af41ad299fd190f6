"""Train one configuration: plain PyTorch, no Ray.

The pieces (`build_parts`, `train_one_epoch`, `predict`, `score_epoch`) take any iterable of
(images, labels) tensor batches, so the Ray layer drives them with Ray Data iterators while
`fit` drives them in-process with a DataLoader. Everything a trial reports comes from here.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from defect_tune import __version__
from defect_tune.augment import augment_batch, build_augmentation, mixup
from defect_tune.class_stats import ClassCounts
from defect_tune.config import OBJECTIVE, OBJECTIVE_DEFINITION, TrainConfig
from defect_tune.data import check_shards, data_location, load_split, read_meta, sample_weights, to_tensor
from defect_tune.losses import build_loss
from defect_tune.metrics import evaluate, guarded_macro_recall, learn_thresholds, per_class_table
from defect_tune.models import DefectClassifier, build_model, parameter_counts, set_backbone_trainable



class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Parts:
    model: DefectClassifier
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    per_batch_schedule: bool
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    net: nn.Module | None = None  # what training calls: the model, or its DDP wrapper under Ray Train

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = self.model


class EarlyStopping:
    """Patience on the objective (higher is better); patience 0 never stops."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.waited = patience, float("-inf"), 0, 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's objective; True when it is the best so far."""
        if value > self.best:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return True
        self.waited += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _schedule(config: TrainConfig, optimizer, steps_per_epoch: int):
    total = max(config.epochs * steps_per_epoch, 1)
    if config.schedule == "cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if config.schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total), True
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2), False
    return None, False


def build_parts(config: TrainConfig, meta: dict, steps_per_epoch: int, device: torch.device) -> Parts:
    counts = ClassCounts.from_meta(meta, ("train",))
    model = build_model(config, len(meta["classes"])).to(device)
    on_gpu = device.type == "cuda" and config.amp
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    head = {id(p) for p in model.head_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in head], "lr": config.lr * config.backbone_lr_factor},
        {"params": model.head_parameters(), "lr": config.lr},
    ]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, per_batch = _schedule(config, optimizer, steps_per_epoch)
    autocast_dtype = scaler = None
    if on_gpu:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if autocast_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    return Parts(model, build_loss(config, counts).to(device), optimizer, scheduler, per_batch, device, autocast_dtype, scaler)


def _to_device(parts: Parts, x: torch.Tensor, y: torch.Tensor):
    x = x.to(parts.device, non_blocking=True)
    if parts.autocast_dtype is not None:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(parts.device, non_blocking=True).float()


def train_one_epoch(parts: Parts, config: TrainConfig, batches: Iterable, epoch: int, rng: np.random.Generator,
                    on_batch: Callable[[], None] | None = None, finish_on_nonfinite: bool = False) -> dict:
    """One pass over `batches` of (images, labels); `epoch` counts from 0.

    A non-finite training loss raises `NonFiniteLoss` at once; with `finish_on_nonfinite` the
    epoch runs to its end and the row's `nonfinite` names the first such batch instead. One of
    several DDP workers must not leave an epoch early: the others would wait for it forever in
    the next gradient all-reduce."""
    model = parts.model
    model.train()
    set_backbone_trainable(model, epoch >= config.freeze_epochs)
    total, seen, nonfinite = 0.0, 0, None
    for step, (x, y) in enumerate(batches):
        x, y = _to_device(parts, x, y)
        if config.mixup_alpha > 0:
            x, y = mixup(x, y, config.mixup_alpha, config.mixup_labels, rng)
        with torch.autocast(parts.device.type, dtype=parts.autocast_dtype, enabled=parts.autocast_dtype is not None):
            logits = parts.net(x)
        loss = parts.loss_fn(logits.float(), y)
        if nonfinite is None and not torch.isfinite(loss):
            nonfinite = f"epoch {epoch + 1}, batch {step + 1}: training loss is {loss.item()}"
            if not finish_on_nonfinite:
                raise NonFiniteLoss(nonfinite)
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.scaler is not None:
            parts.scaler.scale(loss).backward()
            parts.scaler.unscale_(parts.optimizer)
        else:
            loss.backward()
        if config.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()
        if parts.per_batch_schedule:
            parts.scheduler.step()
        total += loss.item() * len(x)
        seen += len(x)
        if on_batch is not None:
            on_batch()
    row = {"train_loss": total / max(seen, 1), "lr": parts.optimizer.param_groups[-1]["lr"]}
    return row if nonfinite is None else {**row, "nonfinite": nonfinite}


@torch.no_grad()
def predict(parts: Parts, batches: Iterable) -> tuple[np.ndarray, np.ndarray, float]:
    """Sigmoid probabilities, targets and mean loss over `batches`."""
    parts.model.eval()
    probs, targets, total, seen = [], [], 0.0, 0
    for x, y in batches:
        x, y = _to_device(parts, x, y)
        with torch.autocast(parts.device.type, dtype=parts.autocast_dtype, enabled=parts.autocast_dtype is not None):
            logits = parts.model(x).float()
        total += parts.loss_fn(logits, y).item() * len(x)
        seen += len(x)
        probs.append(torch.sigmoid(logits).cpu().numpy())
        targets.append(y.cpu().numpy())
    if not probs:
        return np.zeros((0, 0)), np.zeros((0, 0)), float("nan")
    return np.concatenate(probs), np.concatenate(targets), total / max(seen, 1)


def score_epoch(probs: np.ndarray, targets: np.ndarray, config: TrainConfig, classes: list[str]) -> dict:
    """What every epoch reports: the guarded objective with the figures behind it.

    The objective is the macro recall at per-class thresholds that reach the precision floor,
    which is exactly `metrics.guarded_macro_recall`; computing the report once here also gives
    the per-class recalls and the macro precision at those same thresholds.
    """
    thresholds = learn_thresholds(probs, targets, "recall_at_precision", config.precision_floor, "pr_curve")
    guarded = evaluate(probs, targets, classes, thresholds)
    plain = evaluate(probs, targets, classes, 0.5, intervals=False)  # only its macro recall is kept
    interval = guarded["macro"]["recall_interval"] or [None, None]
    row = {
        OBJECTIVE: guarded["macro"]["recall"] or 0.0,
        # 95 % bootstrap interval over validation images, at the same thresholds: with a handful of
        # rare-class images, trials whose intervals overlap are not told apart by this split.
        f"{OBJECTIVE}_low": interval[0], f"{OBJECTIVE}_high": interval[1],
        "val_macro_precision": guarded["macro"]["precision"],
        "val_macro_f2": guarded["macro"]["f2"],
        "val_macro_ap": guarded["macro"]["average_precision"],
        "val_macro_recall@0.5": plain["macro"]["recall"],
    }
    row.update({f"val_recall/{c}": guarded["per_class"][c]["recall"] for c in classes})
    # The counts behind each recall (5 of 6), from which the leaderboard gives its Wilson interval.
    row.update({f"val_recalled/{c}": guarded["per_class"][c]["tp"] for c in classes})
    row.update({f"val_positives/{c}": guarded["per_class"][c]["support"] for c in classes})
    if (config.threshold_rule, config.threshold_method) != ("recall_at_precision", "pr_curve"):
        thresholds = learn_thresholds(probs, targets, config.threshold_rule, config.precision_floor, config.threshold_method)
    # The thresholds production would use with this epoch's weights (`export` takes the best epoch's).
    row.update({f"threshold/{c}": float(t) for c, t in zip(classes, thresholds)})
    return row


# Device memory a CUDA process holds outside torch's allocator: its context and the kernels
# loaded into it (lazily since CUDA 11.7). The process cannot see it without NVML, so this is an
# allowance, not a measurement: no GPU was at hand when it was written (2026-12-01).
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
    row = train_one_epoch(parts, config, batches, config.freeze_epochs, np.random.default_rng(config.seed), finish_on_nonfinite=True)
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


def make_loader(images, labels, config: TrainConfig, pipeline=None, train: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if train:
        if config.oversample_power > 0:
            weights = torch.from_numpy(sample_weights(labels, config.oversample_power))
            sampler = WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)
        else:
            sampler = RandomSampler(range(len(labels)), generator=generator)
    return DataLoader(
        _Images(images, labels, pipeline), batch_size=config.batch_size, sampler=sampler, collate_fn=_collate,
        num_workers=config.num_workers, worker_init_fn=_reseed_worker if config.num_workers else None,
        drop_last=train and len(labels) > config.batch_size, generator=generator,
    )


def load_checkpoint(path: Path, model: nn.Module) -> None:
    """Weights only: a checkpoint never runs code when loaded."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def fit(config: TrainConfig, data_dir: Path, out_dir: Path, device: str = "auto", on_epoch=None, on_batch=None) -> dict:
    """Train one configuration on `prepare`'s output, in this process; write OUT/results.json,
    OUT/per_class.txt, OUT/config.yaml and OUT/best.pt. A NaN/inf loss ends the run as failed."""
    started = time.perf_counter()
    meta = read_meta(data_dir)
    check_shards(data_dir, meta)  # before anything is written to OUT
    out_dir = Path(out_dir)
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
        "parameters": parameter_counts(parts.model),
        "device": str(parts.device),
        "versions": {"defect_tune": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "history": [],
    }
    stopper, best_state = EarlyStopping(config.early_stopping_patience), None
    try:
        for epoch in range(config.epochs):
            epoch_started = time.perf_counter()
            row = {"epoch": epoch + 1, **train_one_epoch(parts, config, train_loader, epoch, rng, on_batch)}
            probs, targets, row["val_loss"] = predict(parts, val_loader)
            row.update(score_epoch(probs, targets, config, classes))
            row["seconds"] = round(time.perf_counter() - epoch_started, 3)
            results["history"].append(row)
            if parts.scheduler is not None and not parts.per_batch_schedule:
                parts.scheduler.step(row[OBJECTIVE])
            if stopper.update(row[OBJECTIVE], epoch + 1):
                best_state = copy.deepcopy(parts.model.state_dict())
                torch.save(best_state, out_dir / "best.pt")
            if on_epoch is not None:
                on_epoch(row)
            if stopper.should_stop:
                break
    except NonFiniteLoss as error:
        results.update(status="failed", error=str(error), seconds=round(time.perf_counter() - started, 3))
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
        raise

    parts.model.load_state_dict(best_state)  # early stopping restores the best epoch's weights
    probs, targets, _ = predict(parts, val_loader)
    thresholds = learn_thresholds(probs, targets, config.threshold_rule, config.precision_floor, config.threshold_method)
    val_report = evaluate(probs, targets, classes, thresholds)
    trivial = {"all_positive": np.ones_like(targets), "random": np.random.default_rng(config.seed).random(targets.shape)}
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
        best_objective=stopper.best,
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
