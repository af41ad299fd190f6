"""The one epoch loop that every driver runs: `defect-tune train`, each search trial and fold
(the Ray Train worker loop) and `retrain`. Plain PyTorch, no Ray.

A driver hands the loop its batches and its way of reporting through `Hooks`; everything a
config decides (sampling, schedule, loss, MixUp, freezing, clipping, early stopping) happens in
here or in the core functions it calls, so a config trains the same way whichever driver runs
it. `tests/test_engine.py` fails when a key changes training under one driver and not another.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from defect_tune.core.class_stats import ClassCounts
from defect_tune.core.config import OBJECTIVE, SELECTION, TrainConfig, selection_score
from defect_tune.core.errors import UserError
from defect_tune.core.metrics import evaluate, learn_thresholds
from defect_tune.data.augment import mixup
from defect_tune.data.shards import sample_weights, to_tensor
from defect_tune.training.losses import build_loss
from defect_tune.training.models import DefectClassifier, build_model, set_backbone_trainable


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
    """Patience on the selection score (the objective, ties broken by AP; higher is better);
    patience 0 never stops."""

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
    """`--device`: auto (a GPU when there is one), cpu, cuda or cuda:N; UserError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name!r}: no such CUDA GPU is visible here ({torch.cuda.device_count()} found)")
    return device


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
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, per_batch = _schedule(config, optimizer, steps_per_epoch)
    autocast_dtype = scaler = None
    if on_gpu:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if autocast_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    return Parts(model, build_loss(config, counts).to(device), optimizer, scheduler, per_batch, device, autocast_dtype,
                 scaler)


def _to_device(parts: Parts, x: torch.Tensor, y: torch.Tensor):
    x = x.to(parts.device, non_blocking=True)
    if parts.autocast_dtype is not None:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(parts.device, non_blocking=True).float()


def train_one_epoch(parts: Parts, config: TrainConfig, batches: Iterable, epoch: int, rng: np.random.Generator,
                    finish_on_nonfinite: bool = False) -> dict:
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
    row[SELECTION] = selection_score(row[OBJECTIVE], row["val_macro_ap"])
    row.update({f"val_recall/{c}": guarded["per_class"][c]["recall"] for c in classes})
    # The counts behind each recall (5 of 6), from which the leaderboard gives its Wilson interval.
    row.update({f"val_recalled/{c}": guarded["per_class"][c]["tp"] for c in classes})
    row.update({f"val_positives/{c}": guarded["per_class"][c]["support"] for c in classes})
    if (config.threshold_rule, config.threshold_method) != ("recall_at_precision", "pr_curve"):
        thresholds = learn_thresholds(probs, targets, config.threshold_rule, config.precision_floor,
                                      config.threshold_method)
    # The thresholds production would use with this epoch's weights (`export` takes the best epoch's).
    row.update({f"threshold/{c}": float(t) for c, t in zip(classes, thresholds)})
    return row


def draw_order(labels: np.ndarray, oversample_power: float, rng: np.random.Generator) -> np.ndarray:
    """An epoch's order of training images: each once in a random order, or, with
    `oversample_power` > 0, as many draws with replacement weighted by `data.sample_weights`."""
    if oversample_power <= 0:
        return rng.permutation(len(labels))
    weights = sample_weights(labels, oversample_power)
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def memory_batches(images: np.ndarray, labels: np.ndarray, config: TrainConfig, drop_last: bool,
                   rng: np.random.Generator, pipeline=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (images, labels) tensor batches from uint8 images held in memory, drawn by
    `draw_order` and augmented by `pipeline` (albumentations) here."""
    from defect_tune.data.augment import augment_batch

    order = draw_order(labels, config.oversample_power, rng)
    size = config.batch_size
    for start in range(0, len(order) - size + 1 if drop_last else len(order), size):
        index = order[start:start + size]
        chosen = images[index] if pipeline is None else augment_batch(pipeline, images[index])
        yield to_tensor(chosen), torch.from_numpy(labels[index])


class Hooks:
    """What a driver plugs into `run_epochs`. The defaults serve a single process."""

    def train_batches(self, epoch: int) -> Iterable:
        """The epoch's training batches, (images, labels) tensors; `epoch` counts from 0."""
        raise NotImplementedError

    def val_batches(self) -> Iterable | None:
        """Validation batches, or None where this process does not validate (no validation split,
        or a worker other than rank 0)."""
        return None

    def any_nonfinite(self, message: str | None) -> str | None:
        """Several workers: the first worker's non-finite loss message, on every worker."""
        return message

    def agree(self, decision: dict) -> dict:
        """Several workers: rank 0's decision (stop, the plateau schedule's metric) on every worker,
        so that all of them step their schedules and stop alike."""
        return decision

    def end_epoch(self, row: dict, improved: bool, scored: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The epoch's row is complete: report it, checkpoint. `improved`: the best objective so far;
        `scored`: the validation (probabilities, targets) behind the row."""


@dataclass
class Progress:
    """Where a run stands; a resumed run starts from its checkpoint's values."""

    stopper: EarlyStopping
    start_epoch: int = 0


def run_epochs(parts: Parts, config: TrainConfig, classes: list[str], hooks: Hooks, progress: Progress, stop_after: int,
               rng: np.random.Generator, finish_on_nonfinite: bool = False) -> None:
    """Epochs `progress.start_epoch` up to `stop_after` (a schedule is laid out for
    `config.epochs`; production retraining may stop at the sweep's best epoch).

    Each epoch: train, validate where `hooks` gives validation batches (objective, early
    stopping), step an epoch-wise schedule, then `hooks.end_epoch`. ReduceLROnPlateau steps on
    the objective, or on the negated training loss when the run has no validation split.

    Raises:
        NonFiniteLoss: the training loss became NaN or infinite on any worker; its `epoch`
            attribute counts from 1. With `finish_on_nonfinite` the epoch runs to its end first,
            as several DDP workers must (one leaving early would hang the others' all-reduce).
    """
    stopper = progress.stopper
    for epoch in range(progress.start_epoch, stop_after):
        started = time.perf_counter()
        row: dict = {"epoch": epoch + 1}
        try:
            row.update(train_one_epoch(parts, config, hooks.train_batches(epoch), epoch, rng,
                                       finish_on_nonfinite=finish_on_nonfinite))
            nonfinite = row.pop("nonfinite", None)
        except NonFiniteLoss as error:
            nonfinite = str(error)
        nonfinite = hooks.any_nonfinite(nonfinite)
        if nonfinite is not None:
            error = NonFiniteLoss(nonfinite)
            error.epoch = epoch + 1
            raise error
        scored, improved = None, False
        val = hooks.val_batches()
        if val is not None:
            probs, targets, row["val_loss"] = predict(parts, val)
            row.update(score_epoch(probs, targets, config, classes))
            improved = stopper.update(row[SELECTION], epoch + 1)
            row.update(best_epoch=stopper.best_epoch, early_stopped=stopper.should_stop)
            scored = (probs, targets)
        decision = hooks.agree({"stop": stopper.should_stop, "plateau": row.get(SELECTION, -row["train_loss"])})
        if parts.scheduler is not None and not parts.per_batch_schedule:
            parts.scheduler.step(decision["plateau"])
        row["seconds"] = round(time.perf_counter() - started, 3)
        hooks.end_epoch(row, improved, scored)
        if decision["stop"]:
            return
