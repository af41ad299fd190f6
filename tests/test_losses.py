import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from defect_tune.core.class_stats import ClassCounts
from defect_tune.training.losses import (
    AsymmetricLoss,
    BCELoss,
    FocalLoss,
    SmoothedLoss,
    WeightedBCELoss,
    build_loss,
    dynamic_alpha,
    smooth_targets,
)

COUNTS = ClassCounts(positives={"crack": 100, "finger": 20, "rare": 4}, total=500)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def one(loss, logit: float, target: float) -> float:
    """The loss of a single (1, 1) element, as a Python float."""
    return loss(torch.tensor([[logit]]), torch.tensor([[target]])).item()


def soft_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g) * 3, torch.rand(8, 3, generator=g)


def config(**overrides) -> SimpleNamespace:
    values = dict(
        loss="bce",
        class_weight_exponent=0.5,
        class_weight_overrides={},
        focal_gamma=2.0,
        focal_alpha=None,
        asl_gamma_pos=0.0,
        asl_gamma_neg=4.0,
        asl_clip=0.05,
        label_smoothing=0.0,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


# --- BCE and weighted BCE ------------------------------------------------------------------------


def test_bce_matches_a_hand_computed_value_and_torch():
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    expected = -(math.log(sigmoid(2.0)) + math.log(sigmoid(-1.0))) / 2
    assert BCELoss()(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    logits, targets = soft_batch()
    assert torch.allclose(BCELoss()(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))


def test_weighted_bce_scales_positives_only():
    loss = WeightedBCELoss(torch.tensor([3.0, 5.0]))
    logits, targets = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # Column 0 is a positive (weight 3); column 1 is a negative, whose weight 5 must not apply.
    expected = (-3 * math.log(sigmoid(1.0)) - math.log(1 - sigmoid(1.0))) / 2
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert "pos_weight" in dict(loss.named_buffers())


def test_weighted_bce_with_unit_weights_is_bce():
    logits, targets = soft_batch()
    assert torch.equal(WeightedBCELoss(torch.ones(3))(logits, targets), BCELoss()(logits, targets))


# --- focal ----------------------------------------------------------------------------------------


def test_focal_with_gamma_zero_and_no_alpha_is_exactly_bce():
    logits, targets = soft_batch()
    assert torch.equal(FocalLoss(0.0, None)(logits, targets), BCELoss()(logits, targets))


def test_focal_hand_values_for_gamma_2_alpha_quarter():
    loss, p = FocalLoss(2.0, 0.25), sigmoid(1.0)
    assert one(loss, 1.0, 1.0) == pytest.approx(-0.25 * (1 - p) ** 2 * math.log(p), rel=1e-5)
    assert one(loss, 1.0, 0.0) == pytest.approx(-0.75 * p**2 * math.log(1 - p), rel=1e-5)


def test_focal_down_weights_easy_examples_more_than_hard_ones():
    focal, bce = FocalLoss(2.0, None), BCELoss()
    easy, hard = 3.0, -3.0  # both positives: confidently right vs confidently wrong
    easy_ratio = one(focal, easy, 1.0) / one(bce, easy, 1.0)
    hard_ratio = one(focal, hard, 1.0) / one(bce, hard, 1.0)
    assert easy_ratio == pytest.approx((1 - sigmoid(easy)) ** 2, rel=1e-5)
    assert easy_ratio < 0.01 < 0.9 < hard_ratio


def test_focal_per_class_alpha_applies_per_column():
    logits, targets = soft_batch()
    per_class = FocalLoss(2.0, torch.tensor([0.25, 0.5, 0.9]))(logits, targets)
    by_column = [FocalLoss(2.0, a)(logits[:, [c]], targets[:, [c]]) for c, a in enumerate([0.25, 0.5, 0.9])]
    assert per_class.item() == pytest.approx(torch.stack(by_column).mean().item(), rel=1e-6)
    assert "alpha" in dict(FocalLoss(2.0, torch.tensor([0.25])).named_buffers())


# --- asymmetric loss ----------------------------------------------------------------------------


def test_asl_with_zero_parameters_is_exactly_bce():
    logits, targets = soft_batch()
    assert torch.equal(AsymmetricLoss(0.0, 0.0, 0.0)(logits, targets), BCELoss()(logits, targets))


def test_asl_easy_negative_below_clip_contributes_exactly_zero():
    logit = torch.tensor([[-4.0]], requires_grad=True)  # p = 0.018 < clip = 0.05
    value = AsymmetricLoss(0.0, 4.0, 0.05)(logit, torch.tensor([[0.0]]))
    value.backward()
    assert value.item() == 0.0
    assert logit.grad.item() == 0.0
    # Even without focusing (gamma_neg 0) the clip alone silences it, while BCE does not.
    assert one(AsymmetricLoss(0.0, 0.0, 0.05), -4.0, 0.0) == 0.0
    assert one(BCELoss(), -4.0, 0.0) > 0.01


def test_asl_hand_values_for_gamma_neg_4_clip_005():
    loss, p = AsymmetricLoss(0.0, 4.0, 0.05), sigmoid(1.0)
    p_m = p - 0.05
    assert one(loss, 1.0, 0.0) == pytest.approx(-(p_m**4) * math.log(1 - p_m), rel=1e-5)
    assert one(loss, 1.0, 1.0) == pytest.approx(-math.log(p), rel=1e-5)  # gamma_pos 0: positive is BCE


# --- soft targets and label smoothing -------------------------------------------------------------


@pytest.mark.parametrize("loss", [FocalLoss(2.0, 0.25), AsymmetricLoss(1.0, 4.0, 0.05)], ids=["focal", "asl"])
def test_soft_target_half_is_the_average_of_the_hard_losses(loss):
    for logit in (-2.0, 0.3, 2.5):
        average = (one(loss, logit, 1.0) + one(loss, logit, 0.0)) / 2
        assert one(loss, logit, 0.5) == pytest.approx(average, rel=1e-5)


def test_smooth_targets_values_and_range():
    smoothed = smooth_targets(torch.tensor([0.0, 1.0, 0.5]), 0.1)
    assert torch.allclose(smoothed, torch.tensor([0.05, 0.95, 0.5]))
    assert torch.equal(smooth_targets(torch.tensor([0.0, 1.0]), 0.0), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="epsilon"):
        smooth_targets(torch.tensor([1.0]), 0.5)


def test_label_smoothing_is_wired_through_build_loss():
    logits, targets = torch.tensor([[12.0, -12.0]]), torch.tensor([[1.0, 0.0]])  # confident and right
    plain = build_loss(config(loss="bce"), COUNTS)
    smoothed = build_loss(config(loss="bce", label_smoothing=0.1), COUNTS)
    assert isinstance(smoothed, SmoothedLoss) and smoothed.epsilon == 0.1
    assert isinstance(smoothed.loss, BCELoss)
    assert plain(logits, targets).item() < 1e-4
    assert smoothed(logits, targets).item() > 0.5  # penalised for being over-confident
    expected = BCELoss()(logits, smooth_targets(targets, 0.1))
    assert torch.equal(smoothed(logits, targets), expected)


# --- class-dependent parameters and build_loss ----------------------------------------------------


def test_dynamic_alpha_follows_class_frequencies():
    assert torch.allclose(dynamic_alpha(COUNTS, 1.0), torch.tensor([1 - 100 / 500, 1 - 20 / 500, 1 - 4 / 500]))
    assert torch.equal(dynamic_alpha(COUNTS, 0.0), torch.full((3,), 0.5))
    # An override is a weight: crack's 1.5 becomes alpha 1.5 / 2.5.
    assert dynamic_alpha(COUNTS, 1.0, {"crack": 1.5})[0].item() == pytest.approx(0.6)


def test_build_loss_bce_and_weighted_bce_with_override():
    assert type(build_loss(config(loss="bce"), COUNTS)) is BCELoss
    loss = build_loss(config(loss="weighted_bce", class_weight_overrides={"crack": 1.5}), COUNTS)
    assert isinstance(loss, WeightedBCELoss)
    assert torch.allclose(loss.pos_weight, torch.tensor([1.5, math.sqrt(24), math.sqrt(124)]))


def test_build_loss_focal_alphas():
    fixed = build_loss(config(loss="focal", focal_gamma=1.5, focal_alpha=0.25), COUNTS)
    assert isinstance(fixed, FocalLoss) and fixed.gamma == 1.5 and fixed.alpha == 0.25
    assert build_loss(config(loss="focal", focal_alpha=None), COUNTS).alpha is None
    dynamic = build_loss(config(loss="focal", focal_alpha="dynamic", class_weight_exponent=1.0), COUNTS)
    assert torch.allclose(dynamic.alpha, torch.tensor([0.8, 0.96, 0.992]))
    overridden = build_loss(config(loss="focal", focal_alpha="dynamic", class_weight_overrides={"crack": 1.5}), COUNTS)
    assert overridden.alpha[0].item() == pytest.approx(0.6)
    with pytest.raises(ValueError, match="focal_alpha"):
        build_loss(config(loss="focal", focal_alpha="dynamc"), COUNTS)


def test_build_loss_asl_and_unknown_name():
    loss = build_loss(config(loss="asl", asl_gamma_pos=1.0, asl_gamma_neg=3.0, asl_clip=0.02), COUNTS)
    assert isinstance(loss, AsymmetricLoss)
    assert (loss.gamma_pos, loss.gamma_neg, loss.clip) == (1.0, 3.0, 0.02)
    with pytest.raises(ValueError, match=r"'foccal'.*'bce', 'weighted_bce', 'focal', 'asl'"):
        build_loss(config(loss="foccal"), COUNTS)


# --- numerical stability ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        BCELoss(),
        WeightedBCELoss(torch.tensor([2.0, 0.5])),
        FocalLoss(2.0, 0.25),
        FocalLoss(0.5, None),  # gamma < 1: (1 - p)**gamma has an infinite slope where 1 - p rounds to 0
        AsymmetricLoss(1.0, 4.0, 0.05),
        AsymmetricLoss(0.5, 0.5, 0.0),
        AsymmetricLoss(0.0, 0.5, 0.05),
    ],
    ids=["bce", "wbce", "focal", "focal-g0.5", "asl", "asl-noclip-g0.5", "asl-g0.5"],
)
@pytest.mark.parametrize("scale", [50.0, 200.0])
def test_extreme_logits_give_finite_losses_and_gradients(loss, scale):
    logits = torch.tensor([[scale, -scale], [-scale, scale], [scale, -scale]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])  # right, wrong, soft
    value = loss(logits, targets)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()
    # A confidently wrong prediction must still be pushed back, not silently get a zero gradient.
    assert logits.grad[1, 0] < 0
    # Except a wrong negative under ASL's clip: its loss is bounded by -log(clip), so its true
    # gradient at these logits is ~exp(-50) and float32's 0 is the right answer there.
    if not (isinstance(loss, AsymmetricLoss) and loss.clip > 0):
        assert logits.grad[1, 1] > 0
