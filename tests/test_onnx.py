"""model.onnx: the exported graph computes what the PyTorch model does, for every backbone family
the bundled spaces search, at any batch size; predict runs it. No Ray."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_tune.core.config import TrainConfig
from defect_tune.data.shards import load_split, read_meta
from defect_tune.production.onnx_model import (
    ONNX_FILE,
    PARITY_TOLERANCE,
    OnnxModel,
    cpu_latencies,
    export_onnx,
    parity,
    torch_probabilities,
)
from defect_tune.training.models import build_model


@pytest.mark.parametrize("settings", [
    {"model": "el_cnn"},
    {"model": "steel_cnn", "cbam": True},
    {"model": "resnet18", "head": "mlp", "input_size": 48},  # the network resizes its input itself
    {"model": "efficientnet_b0"},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_onnxruntime_gives_pytorchs_probabilities_at_any_batch_size(settings, tmp_path):
    torch.manual_seed(0)
    model = build_model(TrainConfig(pretrained=False, **settings), 4).eval()
    described = export_onnx(model, 40, 56, tmp_path / ONNX_FILE, list("abcd"))
    assert described["input"]["shape"] == ["batch", 1, 40, 56] and described["output"]["name"] == "probabilities"
    onnx = OnnxModel(tmp_path / ONNX_FILE)
    pixels = np.random.default_rng(1).integers(0, 256, (9, 40, 56), dtype=np.uint8)
    for batch in (1, 9):  # the batch axis is dynamic
        got = onnx.probabilities(pixels[:batch])
        assert got.shape == (batch, 4) and ((0 <= got) & (got <= 1)).all()
    assert parity(model, onnx, pixels, batch_size=4) <= PARITY_TOLERANCE
    # The check is not blind: a model with other weights disagrees far beyond the tolerance.
    other = build_model(TrainConfig(pretrained=False, **settings), 4).eval()
    assert np.abs(torch_probabilities(other, pixels) - onnx.probabilities(pixels)).max() > 10 * PARITY_TOLERANCE


def test_latencies_are_per_image_for_both_runtimes_at_batch_1_and_32(tmp_path):
    model = build_model(TrainConfig(model="el_cnn", pretrained=False), 3).eval()
    export_onnx(model, 32, 32, tmp_path / ONNX_FILE, list("abc"))
    latency = cpu_latencies(model, OnnxModel(tmp_path / ONNX_FILE), 32, 32)
    for runtime in ("torch", "onnxruntime"):
        assert set(latency[runtime]) == {"batch_1", "batch_32"} and all(v > 0 for v in latency[runtime].values())


def test_a_file_that_is_not_onnx_is_named(tmp_path):
    from defect_tune.production.onnx_model import OnnxError

    (tmp_path / ONNX_FILE).write_bytes(b"not a graph")
    with pytest.raises(OnnxError, match=f"{ONNX_FILE}: onnxruntime cannot load it"):
        OnnxModel(tmp_path / ONNX_FILE)


def test_predict_with_the_onnx_runtime_matches_torch_and_says_when_there_is_no_onnx(tmp_path, synthetic_data):
    from test_production import source_images, write_model_dir

    from defect_tune.production.model_dir import load_model
    from defect_tune.production.predict import PredictError, predict_images

    classes = read_meta(synthetic_data)["classes"]
    model_dir = write_model_dir(tmp_path, synthetic_data, [0.5] * len(classes))
    images = [str(p) for p in source_images(synthetic_data)[:12]]
    with pytest.raises(PredictError, match=f"{ONNX_FILE}: not found .*use --runtime torch"):
        predict_images(model_dir, images, runtime="onnx")
    meta = read_meta(synthetic_data)
    model, _ = load_model(model_dir, torch.device("cpu"))
    export_onnx(model, meta["image"]["height"], meta["image"]["width"], model_dir / ONNX_FILE, classes)
    for tta in (False, True):
        by_torch = predict_images(model_dir, images, tta=tta, device="cpu")
        by_onnx = predict_images(model_dir, images, tta=tta, runtime="onnx")
        probs = [f"prob/{c}" for c in classes]
        assert np.abs(by_torch[probs].to_numpy() - by_onnx[probs].to_numpy()).max() <= PARITY_TOLERANCE
        assert (by_torch["defects"].fillna("") == by_onnx["defects"].fillna("")).all()
    test_x, _, _ = load_split(synthetic_data, "test", meta)
    assert parity(model, OnnxModel(model_dir / ONNX_FILE), test_x) <= PARITY_TOLERANCE
    assert Path(model_dir / ONNX_FILE).stat().st_size > 0
    # A model.json whose classes were reordered after export names the graph's order, not a wrong table.
    from defect_tune.production.onnx_model import OnnxError

    info = json.loads((model_dir / "model.json").read_text())
    info["classes"] = classes[::-1]
    info["thresholds"] = {c: 0.5 for c in classes}
    (model_dir / "model.json").write_text(json.dumps(info))
    with pytest.raises(OnnxError, match=(r"model.json: classes \[.*\] differ from the order "
                                         r"of those model.onnx was exported with")):
        predict_images(model_dir, images, runtime="onnx")
