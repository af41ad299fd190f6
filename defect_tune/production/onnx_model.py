"""The model as ONNX, for software that loads no PyTorch: `retrain` writes `model.onnx` beside the
safetensors weights, `predict --runtime onnx` runs it with onnxruntime.

The graph takes what `prepare` stores and `predict` decodes: grayscale pixels fitted to the model
directory's height and width, as float32 values 0..255, shape (N, 1, H, W). It normalises them
itself and returns per-class probabilities (sigmoid), shape (N, classes), so a caller needs only
the thresholds in model.json to decide. It imports no Ray.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defect_tune.core.errors import UserError
from defect_tune.data.shards import MEAN, STD
from defect_tune.training.cost import median_ms_per_item

ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "pixels", "probabilities"
# onnxruntime and PyTorch add and multiply in different orders: float32 probabilities agree to
# about 1e-6. A gap above this means the graph computes something else.
PARITY_TOLERANCE = 1e-4


class OnnxError(UserError):
    """A model.onnx that cannot be written or run; the message names the file."""


class _Deployed(nn.Module):
    """Pixels in, probabilities out: the normalisation and sigmoid that PyTorch callers do outside."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model((pixels / 255.0 - MEAN) / STD))


def export_onnx(model: nn.Module, height: int, width: int, path: Path, classes: list[str]) -> dict:
    """Writes `model` (on the CPU, in eval mode) to `path` with a dynamic batch size, its class
    names in the graph's metadata (`classes`, JSON), so that a model.json edited or swapped
    later is caught before it names the probabilities; returns what model.json records about it."""
    deployed = _Deployed(model).cpu().eval()
    example = torch.full((2, 1, height, width), 128.0)
    with warnings.catch_warnings():  # the exporter's progress and deprecation chatter
        warnings.simplefilter("ignore")
        program = torch.onnx.export(deployed, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)
    program.model.metadata_props["classes"] = json.dumps(classes)  # onnx_ir's model, before it is written
    program.save(str(path))
    return {"file": path.name, "input": {"name": INPUT, "shape": ["batch", 1, height, width], "dtype": "float32",
                                         "values": "grayscale pixels 0..255, fitted as preprocessing says"},
            "output": {"name": OUTPUT, "shape": ["batch", "classes"], "values": "per-class probability"}}


class OnnxModel:
    """`model.onnx` under onnxruntime on the CPU."""

    def __init__(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad file
            raise OnnxError(f"{path}: onnxruntime cannot load it: {str(error).splitlines()[0]}") from None
        recorded = self.session.get_modelmeta().custom_metadata_map.get("classes")
        self.classes: list[str] | None = json.loads(recorded) if recorded else None  # None: written before they were
        width = self.session.get_outputs()[0].shape[-1]
        self.outputs: int | None = width if isinstance(width, int) else None

    def check_classes(self, classes: list[str], model_json: Path) -> None:
        """model.json's classes are the graph's, in its order: else every probability would go
        under another class's name."""
        path = model_json.parent / ONNX_FILE
        if self.classes is not None and self.classes != classes:
            same = sorted(self.classes) == sorted(classes)
            raise OnnxError(f"{model_json}: classes {classes} differ from {'the order of ' if same else ''}those "
                            f"{path.name} was exported with, {self.classes}; restore model.json's classes")
        if self.outputs is not None and self.outputs != len(classes):
            raise OnnxError(f"{model_json}: lists {len(classes)} classes, but {path.name} has {self.outputs} outputs; "
                            "model.json does not belong to this graph")

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 or (N, 1, H, W) float pixels to (N, classes) probabilities."""
        x = pixels.astype(np.float32)
        if x.ndim == 3:
            x = x[:, None]
        return self.session.run([OUTPUT], {INPUT: x})[0]


def torch_probabilities(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """The same as `OnnxModel.probabilities`, from the PyTorch model on the CPU in float32."""
    with torch.no_grad():
        return _Deployed(model).cpu().eval()(torch.from_numpy(pixels.astype(np.float32))[:, None]).numpy()


def parity(model: nn.Module, onnx: OnnxModel, pixels: np.ndarray, batch_size: int = 64) -> float:
    """The largest difference between onnxruntime's and PyTorch's probabilities over `pixels`."""
    worst = 0.0
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        worst = max(worst, float(np.abs(onnx.probabilities(chunk) - torch_probabilities(model, chunk)).max()))
    return worst


def latency_ms(run: Callable[[np.ndarray], object], height: int, width: int, batch: int, repeats: int = 7) -> float:
    """Median milliseconds per image of `run` on a batch of `batch` random images."""
    pixels = np.random.default_rng(0).integers(0, 256, (batch, height, width), dtype=np.uint8)
    return round(median_ms_per_item(lambda: run(pixels), batch, repeats), 3)


def cpu_latencies(model: nn.Module, onnx: OnnxModel, height: int, width: int) -> dict:
    """Milliseconds per image on this machine's CPU, PyTorch and onnxruntime, at batch 1 and 32."""
    threads = torch.get_num_threads()
    return {
        "device": "cpu", "torch_threads": threads,
        "torch": {f"batch_{b}": latency_ms(lambda p: torch_probabilities(model, p), height, width, b) for b in (1, 32)},
        "onnxruntime": {f"batch_{b}": latency_ms(onnx.probabilities, height, width, b) for b in (1, 32)},
    }
