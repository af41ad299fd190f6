"""The MLflow registry: a model directory logged to a real tracking store and registry (a
SQLite file) registers a version that loads back by name and predicts as `predict` does. No Ray."""

import json

import numpy as np
import pytest
import torch

from defect_tune.data.shards import read_meta
from defect_tune.production.onnx_model import ONNX_FILE, PARITY_TOLERANCE, export_onnx


def test_a_model_directory_logged_to_mlflow_registers_a_version_that_loads_back_and_predicts_as_predict_does(
        tmp_path, synthetic_data, monkeypatch):
    """The round trip against a real MLflow tracking store and registry (a SQLite file): the run
    holds the figures with their intervals, the thresholds, the card; the registered version,
    loaded back by name, gives predict's probabilities and decisions from pixels."""
    import mlflow
    from test_production import source_images, write_model_dir

    from defect_tune.production.model_dir import load_model
    from defect_tune.production.predict import predict_images
    from defect_tune.production.registry import RegistryError, log_model_dir

    meta = read_meta(synthetic_data)
    classes = meta["classes"]
    model_dir = write_model_dir(tmp_path, synthetic_data, [0.3 + 0.1 * k for k in range(len(classes))])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # a SQLite store puts its artifacts in ./mlruns, as MLflow does for any user
    with pytest.raises(RegistryError, match="model.onnx: not found"):
        log_model_dir(model_dir, store, "defects")
    model, _ = load_model(model_dir, torch.device("cpu"))
    export_onnx(model, meta["image"]["height"], meta["image"]["width"], model_dir / ONNX_FILE, meta["classes"])
    first = log_model_dir(model_dir, store, "defects")
    second = log_model_dir(model_dir, store, "defects")
    assert (first["version"], second["version"]) == (1, 2)

    mlflow.set_tracking_uri(store)
    run = mlflow.get_run(first["run_id"])
    assert run.data.params["model"] == "el_cnn" and run.data.tags["defect_tune.classes"] == ",".join(classes)
    low, high = run.data.metrics["test_macro_recall_low"], run.data.metrics["test_macro_recall_high"]
    assert low <= run.data.metrics["test_macro_recall"] <= high
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first["run_id"], "model_dir")}
    assert {"model_dir/MODEL_CARD.md", "model_dir/model.json"} <= artifacts
    thresholds = mlflow.artifacts.load_dict(f"runs:/{first['run_id']}/thresholds.json")
    assert thresholds == dict(zip(classes, [0.3 + 0.1 * k for k in range(len(classes))]))

    served = mlflow.pyfunc.load_model("models:/defects/2")
    assert served.metadata.get_input_schema() is not None  # logged with a signature
    images = source_images(synthetic_data)[:6]
    expected = predict_images(model_dir, [str(p) for p in images], device="cpu").set_index("path")
    from defect_tune.data.images import decode_or_reason
    from defect_tune.data.readers import Item

    pre = json.loads((model_dir / "model.json").read_text())["preprocessing"]
    pixels = np.stack([
        decode_or_reason((Item(id=str(p), path=p, labels=()), pre["image_size"], pre["fit"])).outputs[0].pixels
        for p in images])
    got = served.predict(pixels.astype(np.float32))
    for k, path in enumerate(images):
        for c in classes:
            assert abs(got[f"prob/{c}"][k] - expected.loc[str(path), f"prob/{c}"]) <= PARITY_TOLERANCE
            assert got[f"pred/{c}"][k] == expected.loc[str(path), f"pred/{c}"]
