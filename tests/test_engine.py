"""One engine for every driver: a TrainConfig key that changes training under `defect-tune train`
changes it in a search trial's worker too, and the other way round.

Both drivers run `engine.run_epochs` with their own hooks: `train.LoaderHooks` (DataLoader) and
`worker.WorkerHooks` (a Ray Data shard, here a stand-in with the same `iter_batches` interface,
and Train's `report` captured). Each run is traced (training loss, learning rate and the class
positives drawn, per epoch); a key's effect is its trace against the same config without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defect_tune.core.config import TrainConfig
from defect_tune.data.shards import MEAN, STD
from defect_tune.raytrain.loop_config import LoopConfig
from defect_tune.raytrain.worker import WorkerHooks
from defect_tune.training.engine import EarlyStopping, Progress, build_parts, run_epochs, seed_everything
from defect_tune.training.train import LoaderHooks, make_loader

CLASSES = ["common", "rare"]
EPOCHS = 6  # the plateau schedule (patience 2) first cuts the rate after epoch 4
BASE = dict(model="el_cnn", batch_size=8, epochs=EPOCHS, lr=1e-3, schedule="constant", augment="none", loss="bce",
            early_stopping_patience=0, warmup_epochs=0, seed=3)

# key family: (key, a value that must change training against BASE, where the change must show:
# 0 the training loss, 1 the learning rate, 2 the class positives drawn, per epoch)
EFFECTS = {
    "sampling": ("oversample_power", 1.0, 2),
    "schedule": ("schedule", "plateau", 1),
    "loss": ("loss", "focal", 0),
    "mixup": ("mixup_alpha", 0.4, 0),
    "freezing": ("freeze_epochs", 2, 0),
    "clipping": ("grad_clip_norm", 0.01, 0),
}


def _data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 16, 16), dtype=np.uint8)
    labels = np.zeros((48, 2), np.float32)
    labels[:20, 0] = 1
    labels[20:23, 1] = 1  # 3 of 48: what oversampling must draw more often
    # Validation without positives: the objective stays 0, so a plateau schedule must cut the rate.
    val = rng.integers(0, 256, (8, 16, 16), dtype=np.uint8), np.zeros((8, 2), np.float32)
    return (images, labels), val


META = {"classes": CLASSES, "image": {"height": 16, "width": 16},
        "splits": {"train": {"images": 48, "positives": {"common": 20, "rare": 3}},
                   "val": {"images": 8, "positives": {"common": 0, "rare": 0}}}}


class _Shard:
    """A Ray Data shard's `iter_batches`, over arrays."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def iter_batches(self, batch_size, batch_format, drop_last, local_shuffle_buffer_size=None,
                     local_shuffle_seed=None):
        order = np.arange(len(self.labels))  # no shuffle buffer: the shard's own order
        if local_shuffle_buffer_size:
            order = np.random.default_rng(local_shuffle_seed).permutation(len(self.labels))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield {"image": self.images[index], "labels": self.labels[index]}


def _counting(hooks, drawn: list):
    train_batches = hooks.train_batches

    def counted(epoch):
        drawn.append(np.zeros(len(CLASSES)))
        for x, y in train_batches(epoch):
            drawn[-1] += y.numpy().sum(0)
            yield x, y

    hooks.train_batches = counted
    return hooks


def _trace(driver: str, config: TrainConfig) -> list:
    (images, labels), (val_x, val_y) = _data()
    seed_everything(config.seed)
    meta = META
    drop_last = len(labels) > config.batch_size
    parts = build_parts(config, meta, len(labels) // config.batch_size, torch.device("cpu"))
    stopper = EarlyStopping(config.early_stopping_patience)
    rows: list[dict] = []
    if driver == "train":
        from defect_tune.data.augment import build_augmentation

        pipeline = build_augmentation(config.augment, images.shape[1:], config.seed)
        hooks = LoaderHooks(make_loader(images, labels, config, pipeline, train=True),
                            make_loader(val_x, val_y, config), parts, on_epoch=rows.append)
    else:
        hooks = WorkerHooks(LoopConfig(config=config.model_dump(), meta=meta), config, parts, stopper, drop_last, 0, 1,
                            _Shard(images, labels), _Shard(val_x, val_y), "node",
                            report=lambda row, checkpoint=None: rows.append(row))
    drawn: list = []
    run_epochs(parts, config, CLASSES, _counting(hooks, drawn), Progress(stopper), config.epochs,
               np.random.default_rng(config.seed))
    return [(round(r["train_loss"], 6), r["lr"], tuple(d)) for r, d in zip(rows, drawn)]


@pytest.fixture(scope="module")
def base_traces():
    base = TrainConfig(**BASE)
    return {driver: _trace(driver, base) for driver in ("train", "trial")}


@pytest.mark.parametrize("family", sorted(EFFECTS))
def test_a_key_changes_training_under_every_driver_or_none(family, base_traces):
    key, value, aspect = EFFECTS[family]
    config = TrainConfig(**{**BASE, key: value})
    changed = {driver: ([epoch[aspect] for epoch in _trace(driver, config)]
                        != [epoch[aspect] for epoch in base_traces[driver]])
               for driver in ("train", "trial")}
    assert changed == {"train": True, "trial": True}, f"{key}={value!r} changes training only under {changed}"


def test_oversampling_draws_the_rare_class_more_often_in_a_trial():
    plain = _trace("trial", TrainConfig(**BASE))
    oversampled = _trace("trial", TrainConfig(**{**BASE, "oversample_power": 1.0}))
    rare_plain = sum(drawn[1] for *_, drawn in plain)
    rare_over = sum(drawn[1] for *_, drawn in oversampled)
    assert rare_plain == 3 * EPOCHS  # each image once per epoch (the last partial batch dropped: 48 = 6 x 8)
    assert rare_over > 2 * rare_plain  # weight 16 per rare image against 1-2.4 for the rest


def test_a_plateau_schedule_cuts_the_learning_rate_in_a_trial_as_in_train():
    config = TrainConfig(**{**BASE, "schedule": "plateau"})
    rates = {driver: [lr for _, lr, _ in _trace(driver, config)] for driver in ("train", "trial")}
    for driver, lrs in rates.items():
        assert lrs[:4] == [1e-3] * 4, driver
        assert lrs[4] == pytest.approx(5e-4), driver  # halved after 3 epochs without a better objective
    assert rates["train"] == rates["trial"]


def _epoch_orders(keep: bool, epochs: int = 3) -> list[list[int]]:
    """The training images a reproducible run's worker (`retrain`) draws, epoch by epoch, as
    indices into the shard."""
    (images, labels), _ = _data()
    config = TrainConfig(**BASE)
    seed_everything(config.seed)
    parts = build_parts(config, META, len(labels) // config.batch_size, torch.device("cpu"))
    loop = LoopConfig(config=config.model_dump(), meta=META, reproducible=True, keep_train=keep)
    hooks = WorkerHooks(loop, config, parts, EarlyStopping(0), True, 0, 1, _Shard(images, labels), None, "node")
    index = {image.tobytes(): i for i, image in enumerate(images)}
    orders = []
    for epoch in range(epochs):  # augment "none": each normalised image maps back to one stored image
        stored = [np.rint((x.numpy()[:, 0] * STD + MEAN) * 255).astype(np.uint8) for x, _ in hooks.train_batches(epoch)]
        orders.append([index[image.tobytes()] for batch in stored for image in batch])
    return orders


@pytest.mark.parametrize("keep", [True, False], ids=["kept shard", "streamed shard"])
def test_a_reproducible_run_draws_a_new_order_every_epoch_and_the_same_on_every_run(keep):
    """retrain runs reproducibly; like `train`, each epoch must still see its images in a new order
    (the same epoch in the same order on every run)."""
    first, second = _epoch_orders(keep), _epoch_orders(keep)
    assert first == second
    assert first[0] != first[1] != first[2]
    assert all(len(set(order)) == len(order) == 48 for order in first)  # each image once (48 = 6 x 8)
