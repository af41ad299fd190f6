"""Multi-label losses for heavily imbalanced defect classification.

Every loss takes `logits` (N, C) and `targets` (N, C) in [0, 1] and returns the mean over all N*C
elements. Targets may be soft (label smoothing, MixUp), so each formula is written with `y` and
`1 - y` as weights rather than by selecting the positive or negative branch. Logs come from
`F.logsigmoid` (log p = logsigmoid(x), log(1 - p) = logsigmoid(-x)): `torch.log(torch.sigmoid(x))`
is -inf once sigmoid underflows, which turns a confidently wrong prediction into a NaN gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defect_tune.core.class_stats import ClassCounts, class_weights

LOSSES = ("bce", "weighted_bce", "focal", "asl")


class BCELoss(nn.Module):
    """Plain binary cross-entropy with logits: `-(y log p + (1 - y) log(1 - p))`."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        return -(targets * log_p + (1 - targets) * log_1mp).mean()


class WeightedBCELoss(nn.Module):
    """BCE with the positives of class c scaled by `pos_weight[c]`; negatives are untouched."""

    def __init__(self, pos_weight: Tensor):
        super().__init__()
        # A buffer, not a plain attribute, so `.to(device)` moves it along with the model.
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        return -(self.pos_weight * targets * log_p + (1 - targets) * log_1mp).mean()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) for soft targets.

    `-(a y (1 - p)^gamma log p + (1 - a)(1 - y) p^gamma log(1 - p))`, with `a` a scalar or a
    per-class tensor (C,). alpha=None means both alpha factors are 1 (not 0.5), so gamma=0 with
    alpha=None is exactly BCE.
    """

    def __init__(self, gamma: float, alpha: Tensor | float | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if isinstance(alpha, float | int) and not 0 <= alpha <= 1:
            raise ValueError(f"focal alpha must be in [0, 1], got {alpha}")
        self.gamma = float(gamma)
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha.to(torch.float32))
        else:
            self.alpha = None if alpha is None else float(alpha)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        # (1 - p)^gamma as exp(gamma log(1 - p)): the plain power has an infinite derivative where
        # 1 - p rounds to 0 (logit ~ +17 in float32) for gamma < 1, and 0 * inf is a NaN gradient.
        pos_focus, neg_focus = torch.exp(self.gamma * log_1mp), torch.exp(self.gamma * log_p)
        pos_alpha, neg_alpha = (1.0, 1.0) if self.alpha is None else (self.alpha, 1 - self.alpha)
        pos = pos_alpha * targets * pos_focus * log_p
        neg = neg_alpha * (1 - targets) * neg_focus * log_1mp
        return -(pos + neg).mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al. 2021, ASL) for soft targets.

    Positive part `y (1 - p)^gamma_pos log p`; negative part, on the shifted probability
    `p_m = max(p - clip, 0)`, is `(1 - y) p_m^gamma_neg log(1 - p_m)`; the loss is their negated sum.
    All three parameters at 0 give exactly BCE.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05):
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"ASL gammas must be >= 0, got gamma_pos={gamma_pos}, gamma_neg={gamma_neg}")
        if not 0 <= clip < 1:
            raise ValueError(f"ASL clip must be in [0, 1), got {clip}")
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p = F.logsigmoid(logits)
        pos = targets * torch.exp(self.gamma_pos * F.logsigmoid(-logits)) * log_p
        if self.clip > 0:
            # The shift is what makes very easy negatives (p <= clip) contribute exactly zero, loss
            # and gradient: p_m is floored at 0, so log(1 - p_m) = log 1 = 0 and the floor passes no
            # gradient. A rare class's thousands of easy negatives then stop drowning its few
            # positives, instead of merely being down-weighted as focal loss does.
            p_m = (torch.sigmoid(logits) - self.clip).clamp(min=0)
            # 1 - p_m >= clip > 0 in exact arithmetic; the floor only guards rounding.
            neg = (1 - targets) * p_m**self.gamma_neg * torch.log((1 - p_m).clamp(min=1e-8))
        else:
            # Without the shift p_m = p: use the log-space forms, stable at any logit (as in FocalLoss).
            neg = (1 - targets) * torch.exp(self.gamma_neg * log_p) * F.logsigmoid(-logits)
        return -(pos + neg).mean()


class SmoothedLoss(nn.Module):
    """Applies `smooth_targets(targets, epsilon)` before `loss`."""

    def __init__(self, loss: nn.Module, epsilon: float):
        super().__init__()
        if not 0 <= epsilon < 0.5:
            raise ValueError(f"label smoothing epsilon must be in [0, 0.5), got {epsilon}")
        self.loss, self.epsilon = loss, float(epsilon)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss(logits, smooth_targets(targets, self.epsilon))


def smooth_targets(targets: Tensor, epsilon: float) -> Tensor:
    """Pull hard targets toward 1/2: 1 -> 1 - epsilon/2, 0 -> epsilon/2 (each label is binary)."""
    if not 0 <= epsilon < 0.5:
        raise ValueError(f"label smoothing epsilon must be in [0, 0.5), got {epsilon}")
    return targets * (1 - epsilon) + epsilon / 2


def dynamic_alpha(counts: ClassCounts, exponent: float, overrides: dict[str, float] | None = None) -> Tensor:
    """Per-class focal alpha `w_c / (1 + w_c)` with `w = class_weights(counts, exponent, overrides)`.

    alpha / (1 - alpha) = w_c, so focal's positive-to-negative balance matches weighted BCE's
    pos_weight: exponent 1 gives alpha_c = 1 - P_c/N (the fraction of negatives), exponent 0 gives
    0.5 everywhere. Overrides are weights (crack 1.5 -> alpha 0.6), and let a class with no positives
    have an alpha at all. Ordered as `counts.positives`.
    """
    weights = torch.tensor(list(class_weights(counts, exponent, overrides).values()), dtype=torch.float32)
    return weights / (1 + weights)


def build_loss(config, counts: ClassCounts) -> nn.Module:
    """The loss a trial's config names, with class-dependent parameters taken from `counts`.

    `config` needs attributes loss, class_weight_exponent, class_weight_overrides, focal_gamma,
    focal_alpha (None, a float, or "dynamic"), asl_gamma_pos, asl_gamma_neg, asl_clip and
    label_smoothing.
    """
    exponent, overrides = config.class_weight_exponent, config.class_weight_overrides
    if config.loss == "bce":
        loss = BCELoss()
    elif config.loss == "weighted_bce":
        weights = class_weights(counts, exponent, overrides)
        loss = WeightedBCELoss(torch.tensor(list(weights.values()), dtype=torch.float32))
    elif config.loss == "focal":
        alpha = config.focal_alpha
        if alpha == "dynamic":
            alpha = dynamic_alpha(counts, exponent, overrides)
        elif isinstance(alpha, str):
            raise ValueError(f"focal_alpha must be None, a float or 'dynamic', got {alpha!r}")
        loss = FocalLoss(config.focal_gamma, alpha)
    elif config.loss == "asl":
        loss = AsymmetricLoss(config.asl_gamma_pos, config.asl_gamma_neg, config.asl_clip)
    else:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {list(LOSSES)}")
    return SmoothedLoss(loss, config.label_smoothing) if config.label_smoothing > 0 else loss
