"""A model directory, as `retrain` writes it and `predict` reads it: the weights (safetensors),
config.yaml, model.json (classes, thresholds, preprocessing), metrics.json, per_class.txt and the
model card. It imports no Ray, so that serving a model needs torch and timm only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defect_tune.core.config import TrainConfig
from defect_tune.core.errors import UserError
from defect_tune.core.metrics import PREDICT_NOTHING, per_class_table
from defect_tune.data.images import BIT_DEPTHS, FITS
from defect_tune.training.engine import pick_device
from defect_tune.training.models import build_model

WEIGHTS, MODEL_JSON = "model.safetensors", "model.json"
RARE = 10  # fewer training positives than this: the model card calls the class too rare to trust


class ModelDirError(UserError):
    """A model directory that cannot be read as one; the message names the file."""


def format_figure(value) -> str:
    """A metric as the model card and summaries print it; "-" when there is none."""
    return "-" if value is None else f"{value:.4f}"


def write_model_dir(out: Path, model, config: TrainConfig, info: dict, metrics: dict, files: dict[str, Path] | None = None) -> None:
    """Writes the model directory at `out` whole or not at all (a staging folder, renamed).
    `files`: more files to move in, by their name in the directory (model.onnx)."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, path in (files or {}).items():
        shutil.move(path, staging / name)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(staging / WEIGHTS),
              metadata={"format": "pt", "classes": json.dumps(info["classes"])})
    (staging / "config.yaml").write_text(config.to_yaml())
    (staging / MODEL_JSON).write_text(json.dumps(info, indent=2) + "\n")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = per_class_table(metrics["test"], "TEST (untouched until now; thresholds fixed before it was read)") + "\n"
    if metrics["val"] is not None:
        table = per_class_table(metrics["val"], "VALIDATION (thresholds learned here)") + "\n" + table
    (staging / "per_class.txt").write_text(table)
    (staging / "MODEL_CARD.md").write_text(model_card(info, metrics, table))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def _interval(report: dict) -> str:
    interval = report["macro"].get("recall_interval")
    return "" if not interval else f" (95 % interval {interval[0]:.3f}-{interval[1]:.3f}, bootstrap over the test images)"


def _deployment(info: dict) -> list[str]:
    """The model card's files and latencies (model directories from before ONNX have neither)."""
    onnx, latency = info.get("onnx"), info.get("latency_ms_per_image")
    if not onnx:
        return []
    if "error" in onnx:
        return ["## Deployment", f"- `{WEIGHTS}` for PyTorch (timm) only. No ONNX file: {onnx['error']}.", ""]
    check = onnx["parity"]
    lines = [
        "## Deployment",
        f"- `{WEIGHTS}` for PyTorch (timm), `{onnx['file']}` for onnxruntime or any ONNX runtime. The ONNX graph takes "
        f"{onnx['input']['values']} (`{onnx['input']['name']}`, shape {onnx['input']['shape']}) and returns "
        f"`{onnx['output']['name']}`; a class is present where its probability reaches its threshold in `{MODEL_JSON}`.",
        f"- onnxruntime's probabilities on the {check['images']} {check['split']} images differ from PyTorch's by at most "
        f"{check['max_abs_difference']:.1e} (checked against a tolerance of {check['tolerance']:g}).",
        f"- Milliseconds per image on the CPU of the machine that retrained it ({latency['torch_threads']} PyTorch threads), "
        "median of 7 runs:",
        "",
        "| runtime | batch 1 | batch 32 |",
        "|---|---|---|",
        *(f"| {runtime} | {latency[runtime]['batch_1']:.2f} | {latency[runtime]['batch_32']:.2f} |" for runtime in ("torch", "onnxruntime")),
        "",
    ]
    return lines


def model_card(info: dict, metrics: dict, table: str) -> str:
    training, data, export = info["training"], info["data"], info["export"]
    test = metrics["test"]
    limits = []
    for c in info["classes"]:
        positives = training["train_positives"][c]
        support = test["per_class"][c]["support"]
        if info["thresholds"][c] >= PREDICT_NOTHING:
            limits.append(f"- `{c}`: never predicted. No threshold reached the precision floor on validation.")
        if positives < RARE:
            limits.append(f"- `{c}`: {positives} training images. That is too rare to learn reliably; treat its scores as a hint.")
        if support == 0:
            limits.append(f"- `{c}`: no test images, so its test figures are undefined.")
        elif support < 5:
            row = test["per_class"][c]
            low, high = row["recall_interval"]
            limits.append(f"- `{c}`: {support} test image(s), so its test recall ({row['tp']}/{support}) is a coarse estimate: "
                          f"95 % interval {low:.2f}-{high:.2f}.")
    lines = [
        f"# Model card: {export['name']} trial {export['trial_id']}",
        "",
        f"A multi-label defect classifier ({', '.join(info['classes'])}) trained by `defect-tune retrain` on "
        f"{info['created']}.",
        "",
        "## Data",
        f"- Prepared data `{data['dir']}`, fingerprint `{data['source_fingerprint']}`.",
        f"- Images: {data['images']['train']} train, {data['images']['val']} val, {data['images']['test']} test. "
        f"Trained on {' + '.join(training['train_splits'])}.",
        f"- Preprocessing: grayscale, fit `{info['preprocessing']['fit']}` to "
        f"{info['preprocessing']['height']}x{info['preprocessing']['width']}, normalised "
        f"(x/255 - {info['preprocessing']['mean']}) / {info['preprocessing']['std']}.",
        "",
        "## Training",
        f"- Configuration from `{export['file']}`: trial {export['trial_id']} of sweep `{export['name']}`. "
        f"The sweep's validation objective was {format_figure(export['sweep_objective'])}.",
        f"- {training['epochs_trained']} epochs, best epoch {training['best_epoch']}, seed {training['seed']}.",
        f"- Holdout `{training['holdout']}`. Thresholds were {info['thresholds_from']}.",
        "",
        "## Metric",
        f"The search objective is `{info['objective']['name']}`. {info['objective']['definition']}",
        "",
        f"On the test split this model has macro recall {format_figure(metrics['test_macro_recall'])}{_interval(test)} at its "
        f"thresholds and macro precision {format_figure(test['macro']['precision'])}. The guarded macro recall on test, with thresholds "
        f"chosen on test itself, is {format_figure(metrics['test_guarded_macro_recall'])}; compare it with the sweep's validation figure.",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        *_deployment(info),
        "## Limits",
        *(limits or ["- None flagged by the checks on class counts and thresholds."]),
        "- Validated on images prepared like these only: another camera, resolution or cell type needs its own test.",
        "",
    ]
    return "\n".join(lines)


PREPROCESSING_KEYS = ("image_size", "fit", "height", "width")


def check_model_info(info: dict, path: Path) -> None:
    """Refuse a model.json whose thresholds or preprocessing predict cannot use as they are: a
    NaN threshold would flag no defect anywhere and exit 0."""
    thresholds = info.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ModelDirError(f"{path}: no thresholds (a class -> threshold object)")
    bad = [c for c in info["classes"]
           if isinstance(thresholds.get(c), bool) or not isinstance(thresholds.get(c), int | float)
           or not 0 <= thresholds[c] <= PREDICT_NOTHING]  # NaN fails the comparison
    if bad:
        raise ModelDirError(f"{path}: thresholds for {bad} are missing or not a number between 0 and 1 "
                           f"(or {PREDICT_NOTHING!r}: never predict the class)")
    pre = info.get("preprocessing")
    missing = [key for key in PREPROCESSING_KEYS if not isinstance(pre, dict) or key not in pre]
    if missing:
        raise ModelDirError(f"{path}: preprocessing lacks {missing}; predict cannot prepare images as training did")
    sizes = {key: pre[key] for key in ("image_size", "height", "width")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()) or pre["fit"] not in FITS:
        # Checked here so that predict blames model.json, not every image it then fails to fit.
        raise ModelDirError(f"{path}: preprocessing {pre} needs positive whole sizes and a fit among {FITS}")
    if pre.get("bit_depth") is not None and pre["bit_depth"] not in BIT_DEPTHS:  # absent before --bit-depth existed
        raise ModelDirError(f"{path}: preprocessing bit_depth {pre['bit_depth']!r} is not a whole number of bits "
                            f"from {BIT_DEPTHS[0]} to {BIT_DEPTHS[-1]}")


def read_model_info(model_dir: Path) -> dict:
    """A model directory's model.json, checked (`check_model_info`)."""
    path = Path(model_dir) / MODEL_JSON
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: not found; is {model_dir} a `defect-tune retrain` output?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelDirError(f"{path}: not readable JSON: {error}") from None
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
        raise ModelDirError(f"{path}: no list of classes; not a `defect-tune retrain` model.json")
    check_model_info(info, path)
    return info


def load_model(model_dir: Path, device: torch.device | None = None):
    """A model directory's network (eval mode) and its model.json."""
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    from defect_tune.core.config import ConfigError, load_config

    try:
        config = load_config(model_dir / "config.yaml", {"pretrained": False, "pretrained_path": None})
    except ConfigError as error:
        raise ModelDirError(str(error)) from None
    model = build_model(config, len(info["classes"]))
    weights = model_dir / WEIGHTS
    try:
        model.load_state_dict(load_file(str(weights)))
    except FileNotFoundError:
        raise ModelDirError(f"{weights}: not found; the model directory is incomplete") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:  # a torn file; a shape mismatch (RuntimeError)
        raise ModelDirError(f"{weights}: cannot load the weights: {str(error).splitlines()[0]}") from None
    device = device or pick_device()
    return model.to(device).eval(), info
