"""A model directory, as `retrain` writes it and `predict` reads it: the weights (safetensors),
config.yaml, model.json (classes, thresholds, preprocessing), metrics.json, per_class.txt and the
model card. It imports no Ray, so that serving a model needs torch and timm only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from defect_tune.core.config import TrainConfig
from defect_tune.core.errors import UserError
from defect_tune.core.metrics import PREDICT_NOTHING, per_class_table
from defect_tune.data.choices import FITS
from defect_tune.data.images import BIT_DEPTHS, MAX_IMAGE_SIZE
from defect_tune.training.engine import pick_device
from defect_tune.training.models import build_model

WEIGHTS, MODEL_JSON = "model.safetensors", "model.json"
RARE = 10  # fewer training positives than this: the model card calls the class too rare to trust


class ModelDirError(UserError):
    """A model directory that cannot be read as one; the message names the file."""


def format_figure(value) -> str:
    """A metric as the model card and summaries print it; "-" when there is none."""
    return "-" if value is None else f"{value:.4f}"


def write_model_dir(out: Path, model, config: TrainConfig, info: dict, metrics: dict,
                    files: dict[str, Path] | None = None) -> None:
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
    return "" if not interval else (f" (95 % interval {interval[0]:.3f}-{interval[1]:.3f}, "
                                    "bootstrap over the test images)")


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
        f"`{onnx['output']['name']}`; a class is present where its probability reaches its threshold in "
        f"`{MODEL_JSON}`.",
        f"- onnxruntime's probabilities on the {check['images']} {check['split']} images differ from PyTorch's by at "
        f"most {check['max_abs_difference']:.1e} (checked against a tolerance of {check['tolerance']:g}).",
        f"- Milliseconds per image on the CPU of the machine that retrained it ({latency['torch_threads']} PyTorch "
        "threads), median of 7 runs:",
        "",
        "| runtime | batch 1 | batch 32 |",
        "|---|---|---|",
        *(f"| {runtime} | {latency[runtime]['batch_1']:.2f} | {latency[runtime]['batch_32']:.2f} |"
          for runtime in ("torch", "onnxruntime")),
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
            limits.append(f"- `{c}`: {positives} training images. That is too rare to learn reliably; treat its scores "
                          "as a hint.")
        if support == 0:
            limits.append(f"- `{c}`: no test images, so its test figures are undefined.")
        elif support < 5:
            row = test["per_class"][c]
            low, high = row["recall_interval"]
            limits.append(f"- `{c}`: {support} test image(s), so its test recall ({row['tp']}/{support}) is a coarse "
                          f"estimate: 95 % interval {low:.2f}-{high:.2f}.")
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
        f"On the test split this model has macro recall {format_figure(metrics['test_macro_recall'])}{_interval(test)} "
        f"at its thresholds and macro precision {format_figure(test['macro']['precision'])}. The guarded macro recall "
        f"on test, with thresholds chosen on test itself, is {format_figure(metrics['test_guarded_macro_recall'])}; "
        "compare it with the sweep's validation figure.",
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
    classes = info["classes"]
    if not all(isinstance(c, str) and c for c in classes):
        raise ModelDirError(f"{path}: classes {classes} must be non-empty names")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:  # the second column would overwrite the first's probability and decision
        raise ModelDirError(f"{path}: classes lists {twice} more than once; each class is one output of the model")
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
    if (not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values())
            or pre["fit"] not in FITS):
        # Checked here so that predict blames model.json, not every image it then fails to fit.
        raise ModelDirError(f"{path}: preprocessing {pre} needs positive whole sizes and a fit among {FITS}")
    if sizes["image_size"] > MAX_IMAGE_SIZE or sizes["height"] * sizes["width"] > MAX_IMAGE_SIZE**2:
        # prepare's own bound: a typo here would allocate gigabytes per image before the first prediction.
        raise ModelDirError(f"{path}: preprocessing image_size {sizes['image_size']}, "
                            f"{sizes['height']}x{sizes['width']} is larger than prepare writes (image_size at most "
                            f"{MAX_IMAGE_SIZE}, at most {MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE} pixels)")
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


def _check_classes_match(classes: list[str], recorded: str | None, expected: dict, state: dict,
                         model_json: Path, weights: Path) -> None:
    """model.json's classes are the ones, in the order, the weights' head was trained with: the
    weights' own record where retrain wrote one; otherwise as many as the head has outputs.
    A reordered list would put every probability under another class's name."""
    if recorded is not None:
        try:
            trained = json.loads(recorded)
        except json.JSONDecodeError:
            trained = None
        if isinstance(trained, list) and trained != classes:
            same = sorted(trained) == sorted(classes)
            raise ModelDirError(f"{model_json}: classes {classes} differ from {'the order of ' if same else ''}those "
                                f"{weights.name} was trained with, {trained}; restore model.json's classes")
    # The head: the parameters whose first dimension is the class count and whose shapes differ.
    heads = [(key, tuple(state[key].shape), tuple(value.shape)) for key, value in expected.items()
             if key in state and tuple(state[key].shape) != tuple(value.shape) and value.ndim >= 1
             and value.shape[0] == len(classes) and tuple(state[key].shape[1:]) == tuple(value.shape[1:])]
    if heads:
        key, found, _ = heads[0]
        raise ModelDirError(f"{model_json}: lists {len(classes)} classes, but the weights' head ({key} in "
                            f"{weights.name}) has {found[0]} outputs; model.json does not belong to these weights")


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
        state = load_file(str(weights))
        with safe_open(str(weights), "pt") as handle:
            recorded = (handle.metadata() or {}).get("classes")
    except FileNotFoundError:
        raise ModelDirError(f"{weights}: not found; the model directory is incomplete") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:  # a torn file
        raise ModelDirError(f"{weights}: cannot load the weights: {str(error).splitlines()[0]}") from None
    _check_classes_match(info["classes"], recorded, model.state_dict(), state, model_dir / MODEL_JSON, weights)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as error:  # another backbone than config.yaml names
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) or lines[0]  # the first line is only "Error(s) in loading state_dict"
        raise ModelDirError(f"{weights}: does not fit the {config.model!r} network config.yaml builds: "
                            f"{detail[:300]}") from None
    device = device or pick_device()
    return model.to(device).eval(), info
