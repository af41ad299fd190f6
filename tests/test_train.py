import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from defect_tune.core.config import SELECTION, load_config, selection_score
from defect_tune.core.metrics import guarded_macro_recall
from defect_tune.data.shards import load_split, read_meta, sample_weights, to_tensor
from defect_tune.training import engine as train_module
from defect_tune.training.engine import NonFiniteLoss, build_parts, train_one_epoch
from defect_tune.training.models import build_model
from defect_tune.training.train import OBJECTIVE, fit, load_checkpoint

FAST = ["model=el_cnn", "batch_size=32", "lr=0.003", "augment=light", "schedule=cosine", "warmup_epochs=0"]


def test_objective_improves_and_beats_trivial_predictors(synthetic_data, tmp_path):
    config = load_config(None, [*FAST, "epochs=5", "early_stopping_patience=0"])
    results = fit(config, synthetic_data, tmp_path / "run", device="cpu")
    history = [row[OBJECTIVE] for row in results["history"]]
    assert results["status"] == "completed" and len(history) == 5
    assert results["best_objective"] == max(history) > history[0] + 0.1

    meta = read_meta(synthetic_data)
    _, val_y, _ = load_split(synthetic_data, "val", meta)
    all_positive = guarded_macro_recall(np.ones_like(val_y), val_y, config.precision_floor)
    random = guarded_macro_recall(np.random.default_rng(0).random(val_y.shape), val_y, config.precision_floor)
    assert results["best_objective"] > max(all_positive, random) + 0.2


def test_results_checkpoint_and_tables_are_written(synthetic_data, tmp_path):
    config = load_config(None, [*FAST, "epochs=2", "model=steel_cnn", "loss=focal", "focal_alpha=dynamic"])
    out = tmp_path / "run"
    results = fit(config, synthetic_data, out, device="cpu")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    classes = read_meta(synthetic_data)["classes"]
    assert list(results["thresholds"]) == classes
    assert set(results["test"]["per_class"]) == set(classes)
    assert results["test"]["thresholds"] == list(results["thresholds"].values())  # val thresholds, unchanged
    assert results["objective"]["name"] == OBJECTIVE and "precision" in results["objective"]["definition"]
    assert results["parameters"]["total"] > 0 and results["data"]["source_fingerprint"].startswith("sha256:")
    assert load_config(out / "config.yaml") == config
    text = (out / "per_class.txt").read_text()
    assert "MACRO AVG" in text and "TEST" in text and all(c in text for c in classes)
    model = build_model(config, len(classes))
    load_checkpoint(out / "best.pt", model)  # weights_only=True
    assert torch.equal(model.head[-1].weight, torch.load(out / "best.pt", weights_only=True)["head.1.weight"])


def test_training_is_reproducible_on_cpu(synthetic_data, tmp_path):
    config = load_config(None, [*FAST, "epochs=2", "augment=standard", "mixup_alpha=0.4", "oversample_power=0.5"])
    a = fit(config, synthetic_data, tmp_path / "a", device="cpu")
    b = fit(config, synthetic_data, tmp_path / "b", device="cpu")
    strip = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    c = fit(load_config(None, [*FAST, "epochs=2", "seed=1"]), synthetic_data, tmp_path / "c", device="cpu")
    assert strip(c["history"]) != strip(a["history"])


def scripted_scores(monkeypatch, scores: list[tuple[float, float]]) -> None:
    """Each epoch's (objective, validation macro AP), in order, in place of the measured ones."""
    scripted, real = iter(scores), train_module.score_epoch

    def score(*args):
        objective, ap = next(scripted)
        return {**real(*args), OBJECTIVE: objective, "val_macro_ap": ap, SELECTION: selection_score(objective, ap)}

    monkeypatch.setattr(train_module, "score_epoch", score)


def test_early_stopping_restores_the_best_epoch(synthetic_data, tmp_path, monkeypatch):
    scripted_scores(monkeypatch, [(0.1, 0.5), (0.5, 0.1), (0.4, 0.9), (0.3, 0.9), (0.9, 0.9)])
    config = load_config(None, [*FAST, "epochs=5", "early_stopping_patience=2"])
    results = fit(config, synthetic_data, tmp_path / "run", device="cpu")
    assert [row[OBJECTIVE] for row in results["history"]] == [0.1, 0.5, 0.4, 0.3]  # AP does not outweigh recall
    assert results["best_epoch"] == 2 and results["best_objective"] == 0.5 and results["stopped_early"]


def test_a_tie_on_the_objective_goes_to_the_epoch_with_the_higher_validation_ap(synthetic_data, tmp_path, monkeypatch):
    """A saturated objective (every class recalled in full at the floor) must not keep the first
    epoch to reach it: the later one that ranks the validation images better is kept, and a tie
    won on AP counts as progress for patience."""
    scripted_scores(monkeypatch, [(0.8, 0.7), (1.0, 0.8), (1.0, 0.95), (1.0, 0.9), (1.0, 0.85)])
    config = load_config(None, [*FAST, "epochs=5", "early_stopping_patience=2"])
    results = fit(config, synthetic_data, tmp_path / "run", device="cpu")
    assert len(results["history"]) == 5 and results["stopped_early"] is False
    assert results["best_epoch"] == 3 and results["best_objective"] == 1.0


def test_non_finite_loss_fails_the_run_with_a_clear_status(synthetic_data, tmp_path, monkeypatch):
    real = train_module.build_loss

    def poisoned(config, counts):
        loss = real(config, counts)
        calls = iter(range(10**6))
        return lambda logits, y: loss(logits, y) * (float("nan") if next(calls) == 3 else 1.0)

    monkeypatch.setattr(train_module, "build_loss", lambda c, n: _Module(poisoned(c, n)))
    with pytest.raises(NonFiniteLoss, match="epoch 1, batch 4: training loss is nan"):
        fit(load_config(None, [*FAST, "epochs=2"]), synthetic_data, tmp_path / "run", device="cpu")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "nan" in results["error"]


class _Module(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, logits, y):
        return self.fn(logits, y)


def test_frozen_backbone_epochs_train_only_the_head(synthetic_data):
    meta = read_meta(synthetic_data)
    config = load_config(None, [*FAST, "freeze_epochs=1", "backbone_lr_factor=0.1"])
    parts = build_parts(config, meta, steps_per_epoch=4, device=torch.device("cpu"))
    assert [g["lr"] for g in parts.optimizer.param_groups] == pytest.approx([0.0003, 0.003])
    images, labels, _ = load_split(synthetic_data, "train", meta)
    batches = [(to_tensor(images[i : i + 32]), torch.from_numpy(labels[i : i + 32])) for i in range(0, 128, 32)]
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    rng = np.random.default_rng(0)
    train_one_epoch(parts, config, batches, epoch=0, rng=rng)
    after = parts.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    train_one_epoch(parts, config, batches, epoch=1, rng=rng)
    assert not torch.equal(before["backbone.features.0.0.weight"],
                           parts.model.state_dict()["backbone.features.0.0.weight"])


def test_sample_weights_oversample_rare_classes():
    labels = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    weights = sample_weights(labels, power=1.0)
    assert weights.tolist() == [1.25, 1.25, 1.25, 5.0, 1.0]  # N/P: 5/4 for class 0, 5/1 for class 1
    assert (sample_weights(labels, 0.0) == 1.0).all()


def test_train_command_end_to_end(synthetic_data, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "defect_tune", "train", "--data", str(synthetic_data), "--out", str(out),
         "--device", "cpu", "epochs=1", "batch_size=64"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "MACRO AVG" in result.stderr and "best epoch 1" in result.stderr
    assert json.loads((out / "results.json").read_text())["config"]["batch_size"] == 64

    bad = subprocess.run(
        [sys.executable, "-m", "defect_tune", "train", "--data", str(synthetic_data), "--out", str(out), "lr=fast"],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "lr: " in bad.stderr and "Traceback" not in bad.stderr


def test_prepared_data_reads_the_same_from_a_uri_and_uri_errors_name_the_file(synthetic_data, tmp_path):
    """--data s3://... goes through pyarrow's filesystems; file:// is the same code path, here."""
    from defect_tune.data.shards import DataError, data_file, data_location

    uri = synthetic_data.absolute().as_uri()
    assert uri.startswith("file:///") and data_location(uri) == uri  # a URI passes through as given
    assert data_location(synthetic_data) == str(synthetic_data.absolute())
    assert data_file("s3://bucket/el/", "train-00000.parquet") == "s3://bucket/el/train-00000.parquet"
    assert read_meta(uri) == read_meta(synthetic_data)
    for split in ("train", "val", "test"):
        from_uri, from_path = (load_split(uri, split, read_meta(uri)),
                               load_split(synthetic_data, split, read_meta(synthetic_data)))
        assert np.array_equal(from_uri[0], from_path[0]) and np.array_equal(from_uri[1], from_path[1])
        assert from_uri[2] == from_path[2]

    missing = (tmp_path / "nothing").as_uri()
    with pytest.raises(DataError, match=f"^{missing}/meta.json: not found; run `defect-tune prepare` first"):
        read_meta(missing)
    with pytest.raises(DataError, match="^nosuchfs://bucket/data: cannot open: "):
        read_meta("nosuchfs://bucket/data")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=f"^{broken.as_uri()}/meta.json: not valid JSON"):
        read_meta(broken.as_uri())


def _copy_prepared(source, target):
    import shutil

    shutil.copytree(source, target)
    return target, json.loads((target / "meta.json").read_text())


def test_shards_are_checked_whole_before_anything_trains(synthetic_data, tmp_path):
    from defect_tune.data.shards import DataError, check_shards

    check_shards(synthetic_data, read_meta(synthetic_data))  # the real thing passes
    check_shards(synthetic_data.absolute().as_uri(), read_meta(synthetic_data))

    data, meta = _copy_prepared(synthetic_data, tmp_path / "missing")
    shard = meta["splits"]["val"]["shards"][0]["file"]
    (data / shard).unlink()
    with pytest.raises(DataError, match=f"^{data / shard}: not found, but {data / 'meta.json'} lists it"):
        check_shards(data, meta)

    data, meta = _copy_prepared(synthetic_data, tmp_path / "truncated")
    path = data / meta["splits"]["train"]["shards"][0]["file"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"^{path}: content differs from what .* recorded \\(sha256\\)"):
        check_shards(data, meta)
    del meta["splits"]["train"]["shards"][0]["sha256"]  # an older meta.json without hashes: Parquet's own check
    with pytest.raises(DataError, match=f"^{path}: not a readable Parquet file"):
        check_shards(data, meta)

    data, meta = _copy_prepared(synthetic_data, tmp_path / "counts")
    meta["splits"]["test"]["shards"][0]["rows"] += 1
    with pytest.raises(DataError, match="holds 57 rows, .*meta.json says 58"):
        check_shards(data, meta)
    meta["splits"]["test"]["shards"][0]["rows"] -= 1
    meta["splits"]["test"]["images"] = 60
    with pytest.raises(DataError, match="meta.json: split 'test' has 60 images, its shards hold 57 rows"):
        check_shards(data, meta)


def test_search_refuses_corrupt_data_before_starting_ray(synthetic_data, tmp_path):
    data, meta = _copy_prepared(synthetic_data, tmp_path / "corrupt")
    path = data / meta["splits"]["train"]["shards"][0]["file"]
    path.write_bytes(b"PAR1 not really" + path.read_bytes()[20:])
    result = subprocess.run([sys.executable, "-m", "defect_tune", "search", "--data", str(data), "--name", "x",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"{path}: content differs" in result.stderr
    assert "Started a local Ray instance" not in result.stderr and not (tmp_path / "out").exists()


DDP_EPOCH = '''
import json, os, sys
import numpy as np
import torch
import torch.distributed as dist
from defect_tune.core.config import load_config
from defect_tune.data.shards import read_meta
from defect_tune.training.engine import build_parts, train_one_epoch


def worker(rank, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    meta = read_meta(data)
    parts = build_parts(load_config(None, ["batch_size=8", "warmup_epochs=0"]), meta, 5, torch.device("cpu"))
    parts.net = torch.nn.parallel.DistributedDataParallel(parts.model)
    loss, calls = parts.loss_fn, []

    def poisoned(logits, y):  # only rank 1's loss turns NaN, at its second batch
        calls.append(1)
        return loss(logits, y) * (float("nan") if rank == 1 and len(calls) == 2 else 1.0)

    parts.loss_fn = poisoned
    rng = np.random.default_rng(rank)
    size = meta["image"]["height"]
    batches = [(torch.from_numpy(rng.random((8, 1, size, size), dtype=np.float32)),
                torch.from_numpy((rng.random((8, len(meta["classes"]))) < 0.3).astype(np.float32))) for _ in range(5)]
    steps = []

    def counted():  # a batch is taken only once the step before it has finished
        for batch in batches:
            yield batch
            steps.append(1)

    row = train_one_epoch(parts, load_config(None, ["batch_size=8"]), counted(), 0, rng, finish_on_nonfinite=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": len(steps), "nonfinite": row.get("nonfinite")}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
'''


def test_a_ddp_worker_whose_loss_turns_nan_finishes_its_epoch_with_the_others(synthetic_data, tmp_path):
    """With finish_on_nonfinite (a sweep's workers under DDP), a worker whose loss turns NaN does
    not leave the epoch: the other worker would wait for it in the next all-reduce forever. Both
    run every batch and name their first non-finite batch (rank 0's turns NaN one step later,
    through the all-reduced gradient); the worker loop then ends the trial on every rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_epoch.py"
    script.write_text(DDP_EPOCH)
    result = subprocess.run([sys.executable, str(script), str(synthetic_data), str(tmp_path), str(port)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["steps"] for r in ranks] == [5, 5]
    assert ranks[1]["nonfinite"] == "epoch 1, batch 2: training loss is nan"
    assert ranks[0]["nonfinite"] == "epoch 1, batch 3: training loss is nan"
