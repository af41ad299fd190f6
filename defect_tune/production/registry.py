"""A retrained model into an MLflow tracking server and model registry (`retrain --mlflow URI
--register NAME`, or `log_model_dir` on any model directory).

One MLflow run per model directory: the training config as parameters, the test (and validation)
figures with their 95 % intervals as metrics, the thresholds, model card, per-class table and
export as artifacts, and the model itself as an MLflow pyfunc model with a signature. The pyfunc
runs `model.onnx` under onnxruntime, so serving it needs neither torch nor Ray: it takes
(N, H, W) grayscale pixels (0..255, fitted as model.json says) and returns `prob/<class>` and
`pred/<class>` columns, the decisions at the model's own thresholds. Needs the `mlflow` extra
(mlflow-skinny; the SQLAlchemy stores use the SQLAlchemy that Optuna brings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from defect_tune.core.errors import UserError
from defect_tune.production.model_dir import MODEL_JSON, read_model_info

ARTIFACTS = ("MODEL_CARD.md", "per_class.txt", "metrics.json", "config.yaml", MODEL_JSON)


class RegistryError(UserError):
    """A model that cannot be logged or registered; the message says why."""


try:  # the mlflow extra; without it this module still imports, and log_model_dir says what to install
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:
    _PythonModel = object


class DefectModel(_PythonModel):
    """The pyfunc model: model.onnx plus model.json's classes and thresholds."""

    def load_context(self, context) -> None:
        from defect_tune.production.onnx_model import OnnxModel

        self.info = json.loads(Path(context.artifacts["model_json"]).read_text())
        self.onnx = OnnxModel(Path(context.artifacts["model_onnx"]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        pixels = np.asarray(model_input, dtype=np.float32)
        height, width = self.info["preprocessing"]["height"], self.info["preprocessing"]["width"]
        if pixels.ndim == 2:  # rows of flattened images, as a DataFrame arrives
            pixels = pixels.reshape(len(pixels), height, width)
        probs = self.onnx.probabilities(pixels)
        classes = self.info["classes"]
        thresholds = np.array([self.info["thresholds"][c] for c in classes])
        return pd.DataFrame({**{f"prob/{c}": probs[:, k] for k, c in enumerate(classes)},
                             **{f"pred/{c}": (probs[:, k] >= thresholds[k]).astype(np.int64)
                                for k, c in enumerate(classes)}})


def _flat(prefix: str, values: dict) -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(f"{prefix}{key}.", value))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _metrics(metrics: dict) -> dict[str, float]:
    """Test and validation figures with their intervals, as MLflow metric names allow."""
    out = {}
    for split in ("test", "val"):
        report = metrics.get(split)
        if not report:
            continue
        macro = report["macro"]
        for key in ("recall", "precision", "f2"):
            if macro.get(key) is not None:
                out[f"{split}_macro_{key}"] = macro[key]
        if macro.get("recall_interval"):
            out[f"{split}_macro_recall_low"], out[f"{split}_macro_recall_high"] = macro["recall_interval"]
        for name, row in report["per_class"].items():
            safe = "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in name)
            if row.get("recall") is not None:
                out[f"{split}_recall/{safe}"] = row["recall"]
            if row.get("recall_interval"):
                out[f"{split}_recall_low/{safe}"], out[f"{split}_recall_high/{safe}"] = row["recall_interval"]
    if metrics.get("test_guarded_macro_recall") is not None:
        out["test_guarded_macro_recall"] = metrics["test_guarded_macro_recall"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def log_model_dir(model_dir: Path, tracking_uri: str, register: str | None = None, experiment: str = "defect-tune",
                  export_file: Path | None = None) -> dict:
    """Logs a model directory as one MLflow run (and registers a version under `register`);
    returns {"run_id", "model_uri", "version"}."""
    try:
        import mlflow
        from mlflow.models import infer_signature
    except ImportError:
        raise RegistryError("--mlflow needs MLflow: pip install -e '.[mlflow]'") from None
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    onnx_file = model_dir / "model.onnx"
    if not onnx_file.is_file():
        raise RegistryError(f"{onnx_file}: not found ({info.get('onnx', {}).get('error', 'retrain writes it')}); "
                            "the MLflow model serves model.onnx")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    config = (model_dir / "config.yaml").read_text()
    height, width = info["preprocessing"]["height"], info["preprocessing"]["width"]
    example = np.full((2, height, width), 128.0, dtype=np.float32)
    artifacts = {"model_json": str(model_dir / MODEL_JSON), "model_onnx": str(onnx_file)}
    # The signature from what the model really returns on the example (a loaded copy: the one
    # logged is pickled, and an onnxruntime session is not).
    from types import SimpleNamespace

    loaded = DefectModel()
    loaded.load_context(SimpleNamespace(artifacts=artifacts))
    signature = infer_signature(example, loaded.predict(None, example))
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment(experiment)
        export = info.get("export", {})
        with mlflow.start_run(run_name=f"{export.get('name', 'model')} trial {export.get('trial_id', '?')}") as run:
            import yaml

            params = _flat("", yaml.safe_load(config) or {})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics(_metrics(metrics))
            mlflow.log_dict(info["thresholds"], "thresholds.json")
            mlflow.set_tags({"defect_tune.classes": ",".join(info["classes"]),
                             "defect_tune.sweep": str(export.get("name")),
                             "defect_tune.trial": str(export.get("trial_id")),
                             "defect_tune.data_fingerprint": str(info.get("data", {}).get("source_fingerprint"))})
            for name in ARTIFACTS:
                if (model_dir / name).is_file():
                    mlflow.log_artifact(str(model_dir / name), "model_dir")
            if export_file is not None and Path(export_file).is_file():
                mlflow.log_artifact(str(export_file), "export")
            logged = mlflow.pyfunc.log_model(name="model", python_model=DefectModel(), artifacts=artifacts,
                                             signature=signature, registered_model_name=register,
                                             pip_requirements=["onnxruntime", "numpy", "pandas"],
                                             code_paths=[str(Path(__file__).resolve().parents[1])])
    except mlflow.exceptions.MlflowException as error:
        raise RegistryError(f"MLflow at {tracking_uri}: {str(error).splitlines()[0]}") from None
    return {"run_id": run.info.run_id, "model_uri": logged.model_uri,
            "version": None if register is None else int(logged.registered_model_version)}
