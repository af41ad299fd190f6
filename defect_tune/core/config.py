"""One typed config per training run (and per search trial), validated once, at the edge.

Flat on purpose: a search space can address any knob by its name (`focal_gamma`, `lr`), and the
command line overrides any of them with `key=value`.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from defect_tune.core.augment_spec import parse_augment
from defect_tune.core.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used; the message names the key (and the file)."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names one key twice: plain YAML keeps the last value without a word."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping. Every YAML file a user
    writes (config, search space, export) is read through `load_yaml`."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding its keys is the point
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; SafeLoader says so below
                continue
            if first is not None:
                raise DuplicateKeyError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                        f"(first at line {first}); write each key once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """`yaml.safe_load`, refusing duplicate keys (`DuplicateKeyError`, a yaml.YAMLError)."""
    loader = UniqueKeyLoader(text)  # what yaml.safe_load does, with this loader
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# The metric every trial reports and the search maximises. Here, not in train.py, so that what
# only needs the name (leaderboard, export, Ray's per-trial processes) does not import torch and timm.
OBJECTIVE = "val_guarded_macro_recall"
OBJECTIVE_DEFINITION = (
    "Validation macro recall, guarded: for each class with validation positives, the highest recall "
    "reachable at a threshold whose validation precision is at least precision_floor (0 when none "
    "is), averaged over those classes. Predicting every defect everywhere scores 0 on every class "
    "rarer than the floor."
)
# What every choice ranks by (best epoch, kept checkpoint, Optuna, ASHA, leaderboard, export):
# the objective, ties broken by validation macro AP. Ties are common: when validation separates
# every class, the good configs and epochs all score a guarded recall of 1.0, and without a
# tie-break the first to get there would win. The AP term is below any step of a macro recall
# (1 / (classes x positives of a class)) on a validation set of under a million positives per
# class, so it never outweighs one more image recalled.
SELECTION = "val_selection_score"
TIE_BREAK_WEIGHT = 1e-6


def selection_score(objective: float, average_precision: float | None) -> float:
    """The objective plus TIE_BREAK_WEIGHT x validation macro AP (0 where AP is undefined)."""
    ap = average_precision if average_precision is not None and average_precision == average_precision else 0.0
    return objective + TIE_BREAK_WEIGHT * ap


def better(value: float, than: float | None, mode: str) -> bool:
    """Whether `value` beats `than` in the objective's direction (`mode`: max or min); anything
    beats None. The one place a direction is applied to two figures."""
    return than is None or (value > than if mode == "max" else value < than)


def direction(mode: str) -> float:
    """+1 for an objective maximised, -1 for one minimised: times a figure, higher is better."""
    return 1.0 if mode == "max" else -1.0


def selection_metric(objective: str) -> str:
    """The column a sweep ranks by: SELECTION for the built-in objective; a space's own
    objective (any metric its trials report) as it is."""
    return SELECTION if objective == OBJECTIVE else objective


# Beside each checkpoint: the epoch's validation probabilities and targets, for reports. Here for
# the same reason: the report reads them without importing Ray Train.
PREDICTIONS_FILE = "val_predictions.npz"


class TrainConfig(BaseModel):
    """Every default together is the plain baseline recipe (`defect-tune train` with no keys, and
    the `baseline` point of every shipped search space): a timm ResNet-18 from scratch, AdamW
    with a one-cycle schedule, square-root class weights, flips, batch 32, 30 epochs, no early
    stopping (the epoch with the best validation objective is kept). Chosen as a strong generic
    recipe for small grayscale defect sets, not fitted to any dataset here."""

    # allow_inf_nan: an infinite warmup or MixUp alpha would train on in silence or fail as a NaN loss.
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # model: any timm backbone by name, or the seeds' own CNNs ("el_cnn", "steel_cnn")
    model: str = "resnet18"
    pretrained: bool = False  # ImageNet weights, found as training/weights.py says; or pretrained_path
    pretrained_path: str | None = None  # a local weights file (timm's format, or a state dict)
    cbam: bool = False  # CBAM (channel + spatial attention) on the last stage's feature map
    head: Literal["linear", "mlp"] = "linear"  # mlp: the casting seed's deeper head
    head_hidden: int = Field(256, ge=8)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    freeze_epochs: int = Field(0, ge=0)  # train only the head for the first k epochs (steel seed)
    backbone_lr_factor: float = Field(1.0, gt=0.0, le=1.0)  # backbone lr = lr * factor (0.1: fine-tune gently)
    # The longer side, in pixels, the network sees; stored images are resized to it on the fly.
    # None: as `prepare` stored them.
    input_size: int | None = Field(None, ge=16, le=2048)

    # loss
    loss: Literal["bce", "weighted_bce", "focal", "asl"] = "weighted_bce"
    class_weight_exponent: float = Field(0.5, ge=0.0, le=2.0)  # 0.5: the EL seed's square-root weights
    class_weight_overrides: dict[str, float] = Field(default_factory=dict)
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)
    focal_alpha: float | Literal["dynamic"] | None = None
    asl_gamma_pos: float = Field(0.0, ge=0.0, le=10.0)
    asl_gamma_neg: float = Field(4.0, ge=0.0, le=10.0)
    asl_clip: float = Field(0.05, ge=0.0, lt=0.5)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)

    # optimisation
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd is SGD with Nesterov momentum
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "plateau", "constant"] = "onecycle"  # cosine has linear warmup
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip_norm: float = Field(0.0, ge=0.0)  # 0: off
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(30, ge=1)
    amp: bool = True  # bf16/fp16 autocast and channels_last, on GPU only
    mixup_alpha: float = Field(0.0, ge=0.0)  # 0: off
    mixup_labels: Literal["soft", "union"] = "soft"
    oversample_power: float = Field(0.0, ge=0.0, le=1.0)  # 0: off; 1: rare-class images drawn as often as frequent ones
    augment: str = "light"  # a preset (none, light, standard, heavy) or transforms joined by "+"

    # evaluation and early stopping
    precision_floor: float = Field(0.5, gt=0.0, le=1.0)  # the objective's guard, see metrics.guarded_macro_recall
    threshold_rule: Literal["f1", "f2", "recall_at_precision"] = "recall_at_precision"
    threshold_method: Literal["pr_curve", "grid"] = "pr_curve"
    # Epochs without a better objective; 0: off. Off by default: a one-cycle schedule's best
    # weights come at its end, after the high-rate middle that early stopping would cut into.
    early_stopping_patience: int = Field(0, ge=0)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy and torch take 32-bit seeds
    num_workers: int = Field(0, ge=0)  # DataLoader processes for `defect-tune train`

    @field_validator("augment")
    @classmethod
    def _known_augment(cls, value: str) -> str:
        parse_augment(value)
        return value

    @field_validator("focal_alpha")
    @classmethod
    def _alpha_range(cls, value):
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError("focal_alpha must be in (0, 1), 'dynamic', or null")
        return value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


# The starting recipes, each as its changes to the defaults: `train --recipe NAME` and the space
# points of the same name. `scratch` is the plain recipe itself. `transfer` fine-tunes
# EfficientNet-Lite0 from ImageNet, the field's first lever on small defect sets: light enough
# for a CPU, with weights that install as a package (the `weights` extra) for air-gapped
# machines; half the epochs, since a pretrained backbone converges sooner.
RECIPES: dict[str, dict] = {
    "scratch": {},
    "transfer": {"model": "efficientnet_lite0", "pretrained": True, "epochs": 15},
}


def recipe(name: str) -> dict:
    """A recipe's changes to the defaults, or a ConfigError listing the recipes."""
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r}: expected one of {sorted(RECIPES)}")
    return dict(RECIPES[name])


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _explain(error: ValidationError, where: str) -> ConfigError:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(config)"
        if problem["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, TrainConfig.model_fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{key}: unknown key{hint}")
        else:
            # Bounded while it is built: a YAML alias bomb under one key is small as shared
            # objects but gigabytes as a full repr.
            shown = _SHORT.repr(problem.get("input"))
            lines.append(f"{key}: {problem['msg']} (got {shown})")
    return ConfigError(f"{where}: " + "; ".join(lines))


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs; values are read as YAML scalars (0.5, true, null, [a, b])."""
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r}: expected key=value")
        try:
            values[key.strip()] = load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {pair!r}: {error}") from None
    return values


def load_config(path: Path | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> TrainConfig:
    """Defaults, then `base` (a recipe), then the YAML file, then the overrides; validated once."""
    values: dict = dict(base or {})
    where = "config"
    if path is not None:
        where = str(path)
        try:
            loaded = load_yaml(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded or {})
    if overrides:
        values.update(overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
        where += " + overrides"
    return validate_config(values, where)


def validate_config(values: dict, where: str) -> TrainConfig:
    """A TrainConfig from `values`, or a ConfigError naming `where` and each bad key."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise _explain(error, where) from None
