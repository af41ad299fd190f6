"""Models: any timm backbone by name, or the seeds' own CNNs, with one grayscale input channel,
optional CBAM on the last stage, and a head of `num_classes` logits (no softmax: multi-label).

Every backbone offers timm's two-step interface, `forward_features` (the last feature map) and
`forward_head(features, pre_logits=True)` (pooled features), so CBAM and the head sit between
and after them the same way for all of them.
"""

from __future__ import annotations

import difflib
import pickle
from pathlib import Path

import timm
import torch
from timm.layers import create_attn
from torch import nn

from defect_tune.core.errors import UserError
from defect_tune.training.weights import Weights, create_pretrained, find_weights, no_weights


class ModelError(UserError):
    """A model that cannot be built; the message says why and what to do."""


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class ElCNN(nn.Module):
    """The EL seed's ELDefectCNN: progressive channels (32 to 256), batch norm, adaptive average
    pooling; the linear head is added by `DefectClassifier`."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        widths = (1, *channels)
        self.features = nn.Sequential(*(_conv_block(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return self.pool(x).flatten(1)


class SteelCNN(ElCNN):
    """The steel seed's baseline: 4 conv blocks (32-64-128-256, BN, max-pool), global average
    pooling, dense 256 and dropout; the sigmoid is the loss's business."""

    def __init__(self, dropout: float = 0.5):
        super().__init__((32, 64, 128, 256))
        self.dense = nn.Sequential(nn.Linear(256, 256), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return self.dense(super().forward_head(x))


SEED_MODELS = {"el_cnn": ElCNN, "steel_cnn": SteelCNN}


class DefectClassifier(nn.Module):
    """Backbone, optional CBAM, head. With `input_size`, the network first resizes what it is given
    so that its longer side is `input_size` pixels (aspect kept): one `prepare` at a high
    resolution serves every size a search tries, and `predict` needs to know nothing about it."""

    def __init__(self, backbone: nn.Module, num_classes: int, cbam: bool, head: str, hidden: int, dropout: float,
                 input_size: int | None = None):
        super().__init__()
        self.input_size = input_size
        self.backbone = backbone
        self.attention = create_attn("cbam", backbone.num_features) if cbam else nn.Identity()
        # Pooled width; differs from the feature map's where the head has its own conv (MobileNetV3).
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        if head == "mlp":  # the casting seed's deeper head: BN and dropout between two layers
            self.head = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Dropout(dropout / 2), nn.Linear(hidden, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and max(x.shape[-2:]) != self.input_size:
            scale = self.input_size / max(x.shape[-2:])
            size = [max(1, round(side * scale)) for side in x.shape[-2:]]
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        features = self.attention(self.backbone.forward_features(x))
        return self.head(self.backbone.forward_head(features, pre_logits=True))

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything trained from scratch even when the backbone is pretrained or frozen."""
        return [*self.attention.parameters(), *self.head.parameters()]


def resolve_weights(config) -> Weights | None:
    """Where `config`'s backbone weights come from (None: from scratch), checked before any
    training: `pretrained_path`, else for `pretrained: true` the first source `find_weights`
    knows. A ModelError names what is missing and where it looked."""
    if config.pretrained_path:
        path = Path(config.pretrained_path)
        if not path.is_file():  # a FIFO or a device would block the read forever
            raise ModelError(f"pretrained_path {path}: " + ("not a regular file" if path.exists() else "no such file"))
        return Weights(config.model, "file", path)
    if not config.pretrained:
        return None
    if config.model in SEED_MODELS:
        raise ModelError(f"model {config.model!r} has no published weights; give pretrained_path or pretrained=false")
    _check_timm_name(config.model)
    weights = find_weights(config.model)
    if weights is None:
        raise ModelError(f"model {config.model!r}: {no_weights(config.model)}; or set pretrained=false to train from "
                         "scratch")
    return weights


def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelError(f"model {name!r}: not a timm model or one of {sorted(SEED_MODELS)}; close names: {close}")


def build_model(config, num_classes: int) -> DefectClassifier:
    """The model a config names; `config` is a `TrainConfig`."""
    weights = resolve_weights(config)
    if config.model in SEED_MODELS:
        backbone = SEED_MODELS[config.model]()
        if weights is not None:
            try:
                backbone.load_state_dict(torch.load(weights.path, map_location="cpu", weights_only=True))
            except (OSError, RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as error:
                # weights_only refuses arbitrary pickles; its message runs to a page, the first line says why.
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ModelError(f"{weights.path}: cannot load it as weights for {config.model!r}: {first}") from None
    else:
        _check_timm_name(config.model)
        kwargs = {"in_chans": 1, "num_classes": 0}  # timm folds RGB stem weights into one channel
        backbone = (create_pretrained(config.model, weights, **kwargs) if weights is not None
                    else timm.create_model(config.model, pretrained=False, **kwargs))
    return DefectClassifier(backbone, num_classes, config.cbam, config.head, config.head_hidden, config.head_dropout,
                            config.input_size)


def set_backbone_trainable(model: DefectClassifier, trainable: bool) -> None:
    """Freeze or unfreeze the backbone; a frozen backbone also keeps its batch-norm statistics."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(trainable)
    model.backbone.train(trainable and model.training)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
