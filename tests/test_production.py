"""From sweep to production: export's contents, predict's output (fast), retrain on Ray (slow)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from defect_tune.cli import app
from defect_tune.core.config import TrainConfig
from defect_tune.core.metrics import PREDICT_NOTHING, evaluate
from defect_tune.data.shards import read_meta
from defect_tune.production.export import ExportError, build_export, read_export, write_export
from defect_tune.search.options import SearchOptions
from defect_tune.search.results import write_results
from defect_tune.search.space import load_space
from defect_tune.training.models import build_model
from defect_tune.training.train import OBJECTIVE, OBJECTIVE_DEFINITION

SPACE = """\
objective: val_guarded_macro_recall
mode: max
num_samples: 3
max_epochs: 2
asha: {grace_period: 1, reduction_factor: 2}
fixed: {model: el_cnn, batch_size: 64, augment: light, warmup_epochs: 0, early_stopping_patience: 0}
params:
  loss: {choice: [bce, focal]}
  focal_gamma: {uniform: [0.5, 4.0], when: {loss: focal}}
  lr: {loguniform: [3.0e-4, 3.0e-3]}
"""


def make_results(tmp_path: Path, data: Path) -> Path:
    """A sweep's results folder as `search` writes it, from three hand-made leaderboard rows."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    space = load_space(space_file)
    classes = read_meta(data)["classes"]

    def row(trial_id, loss, lr, objective, precision, epochs, best_epoch, reason, status="terminated", gamma=math.nan,
            latency=None, params=None):
        values = {"trial_id": trial_id, "starting_point": None, "param/loss": loss, "param/focal_gamma": gamma,
                  "param/lr": lr, "status": status, "stop_reason": reason, "epochs": epochs,
                  "error": "RuntimeError: boom" if status == "error" else None, OBJECTIVE: objective,
                  "best_epoch": best_epoch, "val_macro_precision": precision,
                  "cost/latency_ms_b1": latency, "cost/params": params}
        for k, c in enumerate(classes):
            values[f"val_recall/{c}"] = None if objective is None else 0.5 + k / 100
            values[f"threshold/{c}"] = (None if objective is None
                                        else (PREDICT_NOTHING if k == 0 else 0.1 * (k + 1) + lr))
        return values

    board = pd.DataFrame([
        row("t_00001", "focal", 1e-3, 0.9, 0.55, 1, 1, "asha", gamma=2.0, latency=4.0, params=8e6),
        row("t_00000", "bce", 2e-3, 0.8, 0.75, 2, 2, "completed", latency=1.5, params=2e6),
        row("t_00002", "bce", 5e-4, None, None, 0, None, "error", status="error"),
    ])
    board.insert(0, "rank", range(1, 4))
    out = tmp_path / "results"
    options = SearchOptions(data=data, space=space_file, name="demo-sweep", out=out)
    write_results(out, board, space, options, str(tmp_path / "tune" / "demo-sweep"), read_meta(data), 12.0,
                  {"CPU": 2}, {"CPU": 2})
    return out


def test_export_picks_the_best_trial_within_latency_and_size_limits_or_names_the_closest(tmp_path, synthetic_data):
    from defect_tune.production.export import parse_count

    results = make_results(tmp_path, synthetic_data)
    assert build_export(results)["sweep"]["trial_id"] == "t_00001"  # the best, at 4 ms and 8M parameters
    within = build_export(results, limits={"cost/latency_ms_b1": 2.0})
    assert within["sweep"]["trial_id"] == "t_00000" and within["sweep"]["limits"] == {"cost/latency_ms_b1": 2.0}
    assert within["sweep"]["cost"] == {"latency_ms_b1": 1.5, "params": 2e6}
    assert build_export(results, limits={"cost/params": parse_count("5M")})["sweep"]["trial_id"] == "t_00000"
    with pytest.raises(ExportError, match=r"no trial meets --max-latency-ms 1, --max-params 3e\+06; "
                                          r"the closest is trial t_00000 with milliseconds per image at batch 1 1.5, "
                                          r"parameters 2e\+06"):
        build_export(results, limits={"cost/latency_ms_b1": 1.0, "cost/params": 3e6})
    assert [parse_count(text) for text in ("5M", "500k", "2500000", "1.2e6")] == [5e6, 5e5, 2.5e6, 1.2e6]
    with pytest.raises(ExportError, match="expected a positive count"):
        parse_count("lots")

    chosen = subprocess.run([sys.executable, "-m", "defect_tune", "export", str(results),
                             "--out", str(tmp_path / "small.yaml"), "--max-params", "5M"],
                            capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0 and "exported trial t_00000" in chosen.stderr and "params <= 5e+06" in chosen.stderr
    assert read_export(tmp_path / "small.yaml")["sweep"]["trial_id"] == "t_00000"


def test_export_holds_config_thresholds_epoch_fingerprint_and_versions(tmp_path, synthetic_data):
    results = make_results(tmp_path, synthetic_data)
    meta = read_meta(synthetic_data)
    out = tmp_path / "best.yaml"
    write_export(build_export(results), out)
    exported = read_export(out)

    assert exported["sweep"]["trial_id"] == "t_00001" and exported["sweep"]["name"] == "demo-sweep"
    assert exported["sweep"]["stop_reason"] == "asha"
    assert exported["best_epoch"] == 1
    assert exported["objective"] == {"name": OBJECTIVE, "mode": "max", "value": 0.9, "precision_floor": 0.5,
                                     "definition": OBJECTIVE_DEFINITION}
    # The full config: the space's fixed values, the trial's sampled ones, the epoch budget.
    config = TrainConfig.model_validate(exported["config"])
    assert (config.model, config.loss, config.focal_gamma, config.lr, config.epochs) == (
        "el_cnn", "focal", 2.0, 1e-3, 2)
    assert config.batch_size == 64 and config.augment == "light"
    classes = meta["classes"]
    assert list(exported["thresholds"]) == classes
    assert exported["thresholds"][classes[0]] == PREDICT_NOTHING
    assert exported["thresholds"][classes[2]] == pytest.approx(0.3 + 1e-3)
    assert exported["data"]["source_fingerprint"] == meta["source_fingerprint"]
    assert exported["data"]["classes"] == classes
    assert exported["versions"]["torch"].startswith("2.14")
    assert exported["versions"]["ray"] and exported["versions"]["python"]


def test_export_rank_and_metric_choose_other_trials(tmp_path, synthetic_data):
    results = make_results(tmp_path, synthetic_data)
    assert build_export(results, rank=2)["sweep"]["trial_id"] == "t_00000"
    by_precision = build_export(results, metric="val_macro_precision")
    assert by_precision["sweep"]["trial_id"] == "t_00000"
    assert by_precision["sweep"]["ranked_by"] == {"metric": "val_macro_precision", "mode": "max"}
    assert build_export(results, metric="val_macro_precision", mode="min")["sweep"]["trial_id"] == "t_00001"
    with pytest.raises(ExportError, match="--rank 3 asked for, but 2 trial"):  # the errored trial is not exportable
        build_export(results, rank=3)
    with pytest.raises(ExportError, match="leaderboard.parquet: no column 'val_f9'"):
        build_export(results, metric="val_f9")


def test_export_cli_and_errors_name_the_file(tmp_path, synthetic_data):
    results = make_results(tmp_path, synthetic_data)
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(results), "--out", str(tmp_path / "x" / "best.yaml"), "--rank", "2"])
    assert done.exit_code == 0, done.output
    assert read_export(tmp_path / "x" / "best.yaml")["sweep"]["trial_id"] == "t_00000"
    missing = runner.invoke(app, ["export", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere/sweep.json: not found" in missing.output
    (tmp_path / "bad.yaml").write_text("config: {}\n")
    with pytest.raises(ExportError, match="bad.yaml: not a `defect-tune export` file"):
        read_export(tmp_path / "bad.yaml")


def test_a_corrupt_results_file_is_one_line_naming_it(tmp_path, synthetic_data):
    good = make_results(tmp_path, synthetic_data)
    runner = CliRunner()
    cases = [
        ("sweep.json", "{oops", "not readable JSON: Expecting property name"),
        ("sweep.json", "[]", "expected a JSON object, got list"),
        ("sweep.json", '{"name": "demo-sweep"}',
         "missing ['objective', 'mode', 'classes', 'data', 'experiment', 'space']"),
        ("trial_configs.json", '{"t_00001": ', "not readable JSON: Expecting value"),
        ("leaderboard.parquet", "PAR1 not really", "not a readable Parquet file"),
    ]
    for k, (name, text, problem) in enumerate(cases):
        results = tmp_path / f"results{k}"
        shutil.copytree(good, results)
        (results / name).write_text(text)
        message = f"{results / name}: {problem}"
        with pytest.raises(ExportError, match=re.escape(message)):
            build_export(results)
        out = tmp_path / f"best{k}.yaml"
        result = runner.invoke(app, ["export", str(results), "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_retrain_refuses_a_bad_holdout_other_classes_or_a_bad_config_before_ray_starts(tmp_path, synthetic_data,
                                                                                       monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init",
                        lambda *args, **kwargs: pytest.fail("retrain started Ray before checking its inputs"))
    classes = read_meta(synthetic_data)["classes"]
    exported = build_export(make_results(tmp_path, synthetic_data))
    write_export(exported, tmp_path / "best.yaml")
    reordered = [*classes[1:], classes[0]]  # the same names in another order: another head, other thresholds
    exported["data"]["classes"] = reordered
    write_export(exported, tmp_path / "reordered.yaml")
    exported["data"]["classes"] = classes
    exported["config"]["lr"] = -1  # hand-edited
    write_export(exported, tmp_path / "edited.yaml")
    model = tmp_path / "model"
    cases = [
        ("best.yaml", ["--holdout", "both"], "--holdout 'both': choose one of val, none"),
        ("reordered.yaml", [], f"{synthetic_data}/meta.json: classes {classes} differ from the export's {reordered}"),
        ("edited.yaml", [], f"{tmp_path / 'edited.yaml'}: config: lr"),
    ]
    for export, options, message in cases:
        result = CliRunner().invoke(app, ["retrain", str(tmp_path / export), "--data", str(synthetic_data),
                                          "--out", str(model), *options])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not model.exists()


def write_model_dir(tmp_path: Path, data: Path, thresholds: list[float]) -> Path:
    """A model directory as `retrain` writes it, around an untrained network (no Ray needed)."""
    from defect_tune.production.model_dir import write_model_dir as _write

    meta = read_meta(data)
    config = TrainConfig(model="el_cnn", pretrained=False)
    torch.manual_seed(0)
    model = build_model(config, len(meta["classes"]))
    info = {"classes": meta["classes"], "thresholds": dict(zip(meta["classes"], thresholds)), "thresholds_from": "test",
            "preprocessing": {"image_size": meta["options"]["image_size"], "fit": meta["image"]["fit"],
                              "height": meta["image"]["height"], "width": meta["image"]["width"],
                              "mean": 0.449, "std": 0.226},
            "training": {"train_positives": {c: 50 for c in meta["classes"]}, "holdout": "val",
                         "train_splits": ["train"], "epochs_trained": 1, "best_epoch": 1, "seed": 0},
            "data": {"dir": str(data), "source_fingerprint": "x", "images": {"train": 1, "val": 1, "test": 1}},
            "export": {"file": "best.yaml", "name": "demo", "trial_id": "t", "sweep_objective": 0.5},
            "objective": {"name": OBJECTIVE, "definition": "d"}, "created": "now"}
    rng = np.random.default_rng(0)
    scores = evaluate(rng.random((20, len(meta["classes"]))), rng.integers(0, 2, (20, len(meta["classes"]))),
                      meta["classes"])
    out = tmp_path / "model"
    _write(out, model, config, info,
           {"test": scores, "val": None, "test_macro_recall": None, "test_guarded_macro_recall": None})
    return out


def source_images(data: Path) -> list[Path]:
    return sorted(p for p in (data.parent / "voc").rglob("*") if p.suffix.lower() in (".png", ".jpg"))


def test_predict_writes_probabilities_and_decisions_per_image(tmp_path, synthetic_data):
    from defect_tune.production.predict import predict_images

    classes = read_meta(synthetic_data)["classes"]
    model_dir = write_model_dir(tmp_path, synthetic_data, [0.5] * (len(classes) - 1) + [PREDICT_NOTHING])
    images = source_images(synthetic_data)[:10]
    Image.fromarray(np.zeros((40, 80), np.uint8)).save(tmp_path / "wide.png")  # pads to the model's square
    (tmp_path / "broken.png").write_bytes(b"not an image")
    table = predict_images(model_dir, [str(p) for p in images[:7]] + [str(images[7].parent / "*.png"),
                                                                      str(tmp_path / "wide.png"),
                                                                      str(tmp_path / "broken.png")])

    paths = table["path"].tolist()
    assert paths[:7] == [str(p) for p in images[:7]]  # order kept, each image once
    assert len(paths) == len(set(paths))
    broken = table[table["path"] == str(tmp_path / "broken.png")].iloc[0]
    assert "cannot decode image" in broken["error"] and pd.isna(broken[f"prob/{classes[0]}"])
    good = table[table["error"].isna()]
    probs = good[[f"prob/{c}" for c in classes]].to_numpy(float)
    assert ((probs >= 0) & (probs <= 1)).all()
    preds = good[[f"pred/{c}" for c in classes]].to_numpy(int)
    assert (preds == (probs >= np.array([0.5] * (len(classes) - 1) + [PREDICT_NOTHING]))).all()
    assert (preds[:, -1] == 0).all()  # a "never" threshold never fires
    for _, row in good.iterrows():
        assert row["defects"] == ";".join(c for c in classes if row[f"pred/{c}"] == 1) or (
            pd.isna(row["defects"]) and not any(row[f"pred/{c}"] for c in classes))

    # TTA averages flips: different numbers, same shape; batch size does not change results.
    tta = predict_images(model_dir, [str(p) for p in images[:4]], tta=True)
    plain = predict_images(model_dir, [str(p) for p in images[:4]], batch_size=3)
    assert not np.allclose(tta[[f"prob/{c}" for c in classes]].to_numpy(float),
                           plain[[f"prob/{c}" for c in classes]].to_numpy(float))
    np.testing.assert_allclose(plain[[f"prob/{c}" for c in classes]].to_numpy(float), probs[:4], rtol=1e-5, atol=1e-6)


def test_predict_cli_csv_and_clear_errors(tmp_path, synthetic_data):
    classes = read_meta(synthetic_data)["classes"]
    model_dir = write_model_dir(tmp_path, synthetic_data, [0.5] * len(classes))
    folder = source_images(synthetic_data)[0].parent
    runner = CliRunner()
    done = runner.invoke(app, ["predict", str(model_dir), str(folder), "--out", str(tmp_path / "preds.csv"), "--tta"])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(tmp_path / "preds.csv")
    assert len(table) == len([p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg")])
    assert list(table.columns[:2]) == ["path", "tiles"] and f"prob/{classes[-1]}" in table.columns
    nothing = runner.invoke(app, ["predict", str(model_dir), str(tmp_path / "missing*.png")])
    assert nothing.exit_code == 2 and "missing*.png: no such file, folder or matching glob" in nothing.output
    not_model = runner.invoke(app, ["predict", str(tmp_path), str(folder)])
    assert not_model.exit_code == 2 and "model.json: not found" in not_model.output


def test_a_broken_model_directory_is_one_line_naming_the_file(tmp_path, synthetic_data):
    classes = read_meta(synthetic_data)["classes"]
    good = write_model_dir(tmp_path / "good", synthetic_data, [0.5] * len(classes))
    folder = source_images(synthetic_data)[0].parent
    runner = CliRunner()

    def broken(name: str, damage) -> Path:
        model = tmp_path / name
        shutil.copytree(good, model)
        damage(model)
        return model

    cases = [
        (broken("json", lambda m: (m / "model.json").write_text("{oops")), "model.json: not readable JSON"),
        (broken("noclasses", lambda m: (m / "model.json").write_text("{}")), "model.json: no list of classes"),
        (broken("noweights", lambda m: (m / "model.safetensors").unlink()),
         "model.safetensors: not found; the model directory is incomplete"),
        (broken("torn", lambda m: (m / "model.safetensors").write_bytes(b"\x08\x00\x00\x00")),
         "model.safetensors: cannot load the weights"),
        (broken("config", lambda m: (m / "config.yaml").write_text("lr: [")), "config.yaml: "),
    ]
    for model, message in cases:
        result = runner.invoke(app, ["predict", str(model), str(folder)])
        assert result.exit_code == 2 and message in result.output, (model, result.output)
        assert str(model) in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_retrain_is_reproducible_and_writes_a_model_directory(tmp_path, synthetic_data, request):
    """Two retrains with the same seed give the same weights on CPU; train+val uses the export's
    epoch and thresholds. Each retrain is a real TorchTrainer run on a local Ray cluster."""
    import ray

    from defect_tune.production.retrain import RetrainError, RetrainOptions, retrain

    results = make_results(tmp_path, synthetic_data)
    best = tmp_path / "best.yaml"
    write_export(build_export(results, rank=2), best)  # bce, 2 epochs, best epoch 2
    ray.init(num_cpus=2, configure_logging=False)  # one local cluster for all three runs; retrain leaves it up
    request.addfinalizer(ray.shutdown)
    runs = [retrain(RetrainOptions(export=best, data=synthetic_data, out=tmp_path / f"model{k}", seed=7))
            for k in (1, 2)]
    first, second = (load_file(str(tmp_path / f"model{k}" / "model.safetensors")) for k in (1, 2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0]["thresholds"] == runs[1]["thresholds"]

    model = tmp_path / "model1"
    assert {p.name for p in model.iterdir()} == {"model.safetensors", "model.onnx", "config.yaml", "model.json",
                                                 "metrics.json", "per_class.txt", "MODEL_CARD.md"}
    info = json.loads((model / "model.json").read_text())
    # model.onnx agrees with the shipped weights on every test image, and the card says how fast each runs.
    checked = info["onnx"]["parity"]
    assert checked["split"] == "test" and checked["images"] == read_meta(synthetic_data)["splits"]["test"]["images"]
    assert checked["max_abs_difference"] <= checked["tolerance"] == 1e-4
    latency = info["latency_ms_per_image"]
    assert all(latency[runtime][batch] > 0 for runtime in ("torch", "onnxruntime") for batch in ("batch_1", "batch_32"))
    assert f"| onnxruntime | {latency['onnxruntime']['batch_1']:.2f} | {latency['onnxruntime']['batch_32']:.2f} |" in \
        (model / "MODEL_CARD.md").read_text()
    classes = read_meta(synthetic_data)["classes"]
    assert (info["training"]["holdout"] == "val" and info["training"]["epochs_trained"] == 2
            and info["training"]["seed"] == 7)
    assert info["training"]["best_epoch"] in (1, 2)
    assert info["thresholds_from"] == "learned on val with the retrained model"
    assert list(info["thresholds"]) == classes
    assert yaml.safe_load((model / "config.yaml").read_text())["seed"] == 7
    metrics = json.loads((model / "metrics.json").read_text())
    assert set(metrics["test"]["per_class"]) == set(classes) and metrics["sweep_val_objective"] == 0.8
    card = (model / "MODEL_CARD.md").read_text()
    assert "demo-sweep" in card and "TEST (untouched" in card and OBJECTIVE in card
    low, high = metrics["test"]["macro"]["recall_interval"]  # bootstrap over test images, stated in the card
    assert low <= metrics["test"]["macro"]["recall"] <= high and f"95 % interval {low:.3f}-{high:.3f}" in card
    assert "95% CI" in (model / "per_class.txt").read_text()

    # train+val: the sweep's best epoch, the exported thresholds, no validation figures.
    exported = read_export(best)
    merged = retrain(RetrainOptions(export=best, data=synthetic_data, out=tmp_path / "merged", holdout="none"))
    assert (merged["training"]["train_splits"] == ["train", "val"]
            and merged["training"]["epochs_trained"] == exported["best_epoch"])
    assert merged["thresholds"] == exported["thresholds"]
    assert json.loads((tmp_path / "merged" / "metrics.json").read_text())["val"] is None

    with pytest.raises(RetrainError, match="exists and is not empty; --overwrite"):
        retrain(RetrainOptions(export=best, data=synthetic_data, out=model))
    assert ray.is_initialized()  # a caller's Ray session survives every retrain


def test_predict_reads_webp_and_keeps_a_folders_other_files_as_rows_saying_why(tmp_path, synthetic_data):
    from defect_tune.production.predict import predict_images

    classes = read_meta(synthetic_data)["classes"]
    model_dir = write_model_dir(tmp_path, synthetic_data, [0.5] * len(classes))
    folder = tmp_path / "line3"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 120, np.uint8)).save(folder / "a.webp")
    Image.fromarray(np.full((32, 32), 60, np.uint8)).save(folder / "b.gif")
    (folder / "notes.txt").write_text("shift 2")
    (folder / ".DS_Store").write_bytes(b"\0")
    table = predict_images(model_dir, [str(folder)]).set_index("path")
    assert sorted(Path(p).name for p in table.index) == ["a.webp", "b.gif", "notes.txt"]
    assert table.loc[str(folder / "a.webp"), "tiles"] == 1 and table.loc[str(folder / "b.gif"), "tiles"] == 1
    assert table.loc[str(folder / "notes.txt"), "error"].startswith("not an image file (suffix .txt)")


def test_serving_a_model_imports_no_ray():
    """`predict` and the model directory it reads need torch and timm only: a production image
    that serves the model does not carry Ray."""
    import subprocess
    import sys

    code = ("import sys, defect_tune.production.predict, defect_tune.production.model_dir; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
