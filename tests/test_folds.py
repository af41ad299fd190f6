"""Cross-validation folds (`search --cv`): drawn from train+val only, disjoint, stratified, and
the fold-mean that a trial reports to Tune."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NEU_DET, needs_neu_det

from defect_tune.core.config import OBJECTIVE
from defect_tune.data.folds import FoldMean, fold_mean, make_folds, rare_classes
from defect_tune.data.shards import read_meta


def _rows(data, meta, splits):
    table = pq.read_table([data / s["file"] for split in splits for s in meta["splits"][split]["shards"]],
                          columns=["id", "group", "labels"])
    labels = np.array(table.column("labels").to_pylist())
    return table.column("id").to_pylist(), table.column("group").to_pylist(), labels


def check_folds(data, k, seed=0):
    meta = read_meta(data)
    folds = make_folds(data, meta, k, seed)
    ids, groups, labels = _rows(data, meta, ("train", "val"))
    test_ids, _, _ = _rows(data, meta, ("test",))
    by_id = dict(zip(ids, range(len(ids)), strict=True))
    held = [set(f["fold"]["val_ids"]) for f in folds]
    assert len(folds) == k
    # Disjoint, and together exactly train+val: every image held out once; test never.
    assert sum(len(h) for h in held) == len(ids)
    assert set().union(*held) == set(ids)
    assert not set().union(*held) & set(test_ids)
    group_fold = {}
    for f, h in enumerate(held):
        for i in h:
            assert group_fold.setdefault(groups[by_id[i]], f) == f  # duplicates and tiles stay together
    for f, fold in enumerate(folds):
        rows = np.array([i in held[f] for i in ids])
        # The fold's meta counts what its parts hold; the test split is as prepare made it.
        assert fold["splits"]["val"]["images"] == len(held[f])
        assert fold["splits"]["train"]["images"] == len(ids) - len(held[f])
        for c, name in enumerate(meta["classes"]):
            assert fold["splits"]["val"]["positives"][name] == int(labels[rows, c].sum())
            assert fold["splits"]["train"]["positives"][name] == int(labels[~rows, c].sum())
        assert fold["splits"]["test"] == meta["splits"]["test"]
        assert fold["fold"] == {"index": f, "of": k, "seed": seed, "val_ids": sorted(held[f])}
    return meta, folds, labels


def test_folds_partition_train_and_val_keep_every_class_and_leave_test_alone(synthetic_data):
    meta, folds, labels = check_folds(synthetic_data, 4)
    for c, name in enumerate(meta["classes"]):
        total = int(labels[:, c].sum())
        per_fold = [f["splits"]["val"]["positives"][name] for f in folds]
        if total >= 4:  # enough images for every fold to hold one out
            assert min(per_fold) >= 1, (name, per_fold)
        assert max(per_fold) - min(per_fold) <= max(2, total // 4), (name, per_fold)  # stratified, not by chance
    again = make_folds(synthetic_data, meta, 4, 0)
    assert [f["fold"]["val_ids"] for f in again] == [f["fold"]["val_ids"] for f in folds]
    assert ([f["fold"]["val_ids"] for f in make_folds(synthetic_data, meta, 4, 1)]
            != [f["fold"]["val_ids"] for f in folds])


@needs_neu_det
def test_folds_on_the_neu_det_long_tail_give_each_rare_class_a_positive_in_every_fold(tmp_path):
    from defect_tune.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source=NEU_DET, format="voc", out=tmp_path / "lt", image_size=16, long_tail=50, workers=1))
    meta, folds, labels = check_folds(tmp_path / "lt", 5)
    assert rare_classes(meta)  # the case --cv is for: a class with under 5 validation positives
    for c, name in enumerate(meta["classes"]):
        if labels[:, c].sum() >= 5:
            assert all(f["splits"]["val"]["positives"][name] >= 1 for f in folds), name


def test_make_folds_refuses_fewer_groups_than_folds(synthetic_data):
    from defect_tune.data.shards import DataError

    meta = read_meta(synthetic_data)
    with pytest.raises(DataError, match="fewer than --cv 1000 folds"):
        make_folds(synthetic_data, meta, 1000)
    with pytest.raises(ValueError, match="at least 2 folds"):
        make_folds(synthetic_data, meta, 1)


def _report(epoch, value, recalled, positives, threshold, checkpoint="ck"):
    return {"epoch": epoch, OBJECTIVE: value, f"{OBJECTIVE}_low": 0.0, f"{OBJECTIVE}_high": 1.0,
            "val_recall/a": recalled / positives, "val_recalled/a": recalled, "val_positives/a": positives,
            "threshold/a": threshold, "val_loss": value * 2, "node_id": "n1", "early_stopped": False,
            "startup/trainer_s": 10.0 + epoch, "checkpoint_path": f"{checkpoint}{epoch}",
            "predictions_path": f"{checkpoint}{epoch}.npz"}


def test_fold_mean_is_the_mean_over_folds_with_pooled_counts_and_a_t_interval():
    rows = [_report(2, 0.6, 3, 4, 0.2, "f0-"), _report(2, 0.8, 2, 2, 0.4, "f1-"), _report(2, 1.0, 1, 1, 0.6, "f2-")]
    row = fold_mean(rows, 2, OBJECTIVE)
    assert row["epoch"] == 2 and row["folds"] == 3
    assert row[OBJECTIVE] == pytest.approx(0.8)
    assert [row[f"{OBJECTIVE}/fold{f}"] for f in range(3)] == pytest.approx([0.6, 0.8, 1.0])
    # sd 0.2; t(0.975, 2) = 4.3027; half-width 4.3027 * 0.2 / sqrt(3) = 0.4968
    assert row[f"{OBJECTIVE}_fold_sd"] == pytest.approx(0.2)
    assert row[f"{OBJECTIVE}_low"] == pytest.approx(0.8 - 0.49683, abs=1e-4)
    assert row[f"{OBJECTIVE}_high"] == 1.0  # 1.297, but a recall cannot pass 1
    assert (row["val_recalled/a"], row["val_positives/a"]) == (6, 7)  # every held-out image once
    assert row["val_recall/a"] == pytest.approx(6 / 7)
    assert row["threshold/a"] == pytest.approx(0.4)  # fold-averaged threshold
    assert row["val_loss"] == pytest.approx(1.6)
    assert row["startup/trainer_s"] == 12.0 and row["node_id"] == "n1" and row["early_stopped"] is False
    assert json.loads(row["fold_checkpoints"]) == ["f0-2", "f1-2", "f2-2"]
    assert json.loads(row["fold_predictions"]) == ["f0-2.npz", "f1-2.npz", "f2-2.npz"]
    assert "predictions_path" not in row
    assert row["checkpoint_path"] == "f0-2"


def test_fold_mean_waits_for_every_fold_and_carries_an_early_stopped_fold_forward():
    mean = FoldMean(2, OBJECTIVE)
    mean.add(0, _report(1, 0.4, 1, 2, 0.5))
    mean.add(0, _report(2, 0.6, 1, 2, 0.5))
    assert mean.ready() == []  # fold 1 has not reached epoch 1
    mean.add(1, _report(1, 0.8, 1, 2, 0.5))
    assert [(r["epoch"], round(r[OBJECTIVE], 6)) for r in mean.ready()] == [(1, 0.6)]
    mean.finish(1)  # fold 1 stopped early after epoch 1
    assert [(r["epoch"], round(r[OBJECTIVE], 6)) for r in mean.ready()] == [(2, 0.7)]
    mean.add(0, _report(3, 1.0, 1, 2, 0.5))
    mean.finish(0)
    assert [(r["epoch"], round(r[OBJECTIVE], 6)) for r in mean.ready()] == [(3, 0.9)]
    assert mean.done and mean.ready() == []


def test_fold_mean_after_a_restart_skips_epochs_a_fold_resumed_past():
    mean = FoldMean(2, OBJECTIVE)
    mean.reported = 1  # epoch 1 reached Tune before the restart
    mean.add(0, _report(3, 0.5, 1, 2, 0.5))  # fold 0 resumed from its epoch-2 checkpoint
    mean.add(1, _report(2, 0.7, 1, 2, 0.5))  # fold 1 from its epoch-1 checkpoint
    assert mean.ready() == []  # epoch 2: fold 0 has no row at or before it
    mean.add(1, _report(3, 0.9, 1, 2, 0.5))
    assert [(r["epoch"], round(r[OBJECTIVE], 6)) for r in mean.ready()] == [(3, 0.7)]
