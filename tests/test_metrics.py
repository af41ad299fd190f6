import json
from fractions import Fraction as F

import numpy as np
import pytest
from sklearn.metrics import (
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from defect_tune.core.metrics import (
    GRID,
    PREDICT_NOTHING,
    bootstrap_macro_recall,
    evaluate,
    guarded_macro_recall,
    learn_thresholds,
    per_class_table,
    wilson_interval,
)

CLASSES = ["crack", "finger", "rare"]
# 6 images x 3 classes; "rare" has no positives in this split.
PROBS = np.array([
    [0.9, 0.2, 0.1],
    [0.8, 0.6, 0.3],
    [0.4, 0.7, 0.2],
    [0.3, 0.1, 0.6],
    [0.6, 0.5, 0.05],
    [0.1, 0.3, 0.4],
])
TARGETS = np.array([
    [1, 0, 0],
    [1, 1, 0],
    [0, 1, 0],
    [1, 0, 0],
    [0, 0, 0],
    [0, 1, 0],
])
THRESHOLDS = np.array([0.35, 0.25, 0.5])


def close(value, fraction) -> bool:
    return value == pytest.approx(float(fraction), rel=1e-12, abs=0)


def test_evaluate_matches_hand_computation():
    report = evaluate(PROBS, TARGETS, CLASSES, THRESHOLDS)
    crack, finger, rare = (report["per_class"][c] for c in CLASSES)

    # crack >= 0.35 predicts images 0,1,2,4; positives are 0,1,3
    assert (crack["tp"], crack["fp"], crack["tn"], crack["fn"], crack["support"]) == (2, 2, 1, 1, 3)
    p, r = F(1, 2), F(2, 3)
    assert close(crack["precision"], p) and close(crack["recall"], r)
    assert close(crack["f1"], 2 * p * r / (p + r)) and close(crack["f1"], F(4, 7))
    assert close(crack["f2"], 5 * p * r / (4 * p + r)) and close(crack["f2"], F(5, 8))
    # ranking 1,1,0,0,1,0: AP = (1 + 1 + 3/5) / 3; AUC: positives beat 3, 3 and 1 of 3 negatives
    assert close(crack["average_precision"], F(13, 15)) and close(crack["roc_auc"], F(7, 9))

    # finger >= 0.25 predicts images 1,2,4,5; positives are 1,2,5
    assert (finger["tp"], finger["fp"], finger["tn"], finger["fn"], finger["support"]) == (3, 1, 2, 0, 3)
    p, r = F(3, 4), F(1)
    assert close(finger["precision"], p) and finger["recall"] == 1.0
    assert close(finger["f1"], F(6, 7)) and close(finger["f2"], 5 * p * r / (4 * p + r))
    assert close(finger["average_precision"], F(11, 12)) and close(finger["roc_auc"], F(8, 9))

    # rare: one false alarm (image 3 at 0.6), no positives -> recall/F/AP/AUC undefined
    assert (rare["tp"], rare["fp"], rare["tn"], rare["fn"], rare["support"]) == (0, 1, 5, 0, 0)
    assert rare["precision"] == 0.0
    assert rare["recall"] is rare["f1"] is rare["f2"] is None
    assert rare["average_precision"] is rare["roc_auc"] is None
    assert report["classes_without_support"] == ["rare"]

    # macro over crack and finger only; AP/AUC over the classes where defined
    macro = report["macro"]
    assert close(macro["precision"], F(5, 8)) and close(macro["recall"], F(5, 6))
    assert close(macro["f1"], F(5, 7)) and close(macro["f2"], F(25, 32))
    assert close(macro["average_precision"], F(107, 120)) and close(macro["roc_auc"], F(5, 6))

    # micro pools TP=5, FP=4, FN=1 (rare's false alarm counts here): differs from macro
    micro = report["micro"]
    assert (micro["tp"], micro["fp"], micro["tn"], micro["fn"]) == (5, 4, 8, 1)
    assert close(micro["precision"], F(5, 9)) and close(micro["recall"], F(5, 6))
    assert close(micro["f1"], F(2, 3)) and close(micro["f2"], F(25, 33))
    assert micro["precision"] != macro["precision"]

    assert close(report["hamming_loss"], F(5, 18))
    assert report["hamming_loss"] == pytest.approx(hamming_loss(TARGETS, PROBS >= THRESHOLDS))
    assert report["samples"] == 6 and report["thresholds"] == [0.35, 0.25, 0.5]


def test_evaluate_agrees_with_sklearn_and_is_strict_json():
    report = evaluate(PROBS, TARGETS, CLASSES, THRESHOLDS)
    precision, recall, _, support = precision_recall_fscore_support(
        TARGETS, PROBS >= THRESHOLDS, zero_division=0
    )
    assert [report["per_class"][c]["precision"] for c in CLASSES] == pytest.approx(precision)
    assert [report["per_class"][c]["support"] for c in CLASSES] == support.tolist()
    assert report["per_class"]["crack"]["recall"] == pytest.approx(recall[0])
    mcm = multilabel_confusion_matrix(TARGETS, (PROBS >= THRESHOLDS).astype(int))
    for name, m in zip(CLASSES, mcm):
        row = report["per_class"][name]
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == m.tolist()
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report


def test_per_class_thresholds_are_honoured_and_a_scalar_broadcasts():
    scalar = evaluate(PROBS, TARGETS, CLASSES, 0.5)
    assert scalar["thresholds"] == [0.5, 0.5, 0.5]
    # finger at 0.5 keeps image 4 (p == 0.5 exactly: prediction is p >= t) but drops image 5
    finger = scalar["per_class"]["finger"]
    assert (finger["tp"], finger["fp"], finger["fn"]) == (2, 1, 1)
    crack = scalar["per_class"]["crack"]
    assert (crack["tp"], crack["fp"], crack["fn"]) == (2, 1, 1)
    per_class = evaluate(PROBS, TARGETS, CLASSES, THRESHOLDS)
    assert per_class["per_class"]["finger"]["tp"] == 3


def test_a_class_present_in_every_image_has_recall_but_no_ranking_scores():
    probs, targets = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1]]), np.array([[1, 0], [1, 1], [1, 0]])
    everywhere = evaluate(probs, targets, ["all", "some"])["per_class"]["all"]
    assert (everywhere["tp"], everywhere["fn"], everywhere["support"]) == (2, 1, 3)
    assert close(everywhere["recall"], F(2, 3))
    assert everywhere["average_precision"] is everywhere["roc_auc"] is None


def test_evaluate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="equal"):
        evaluate(PROBS, TARGETS[:, :2], CLASSES)
    with pytest.raises(ValueError, match="logits"):
        evaluate(PROBS * 4 - 2, TARGETS, CLASSES)
    with pytest.raises(ValueError, match="0/1"):
        evaluate(PROBS, TARGETS * 2, CLASSES)
    with pytest.raises(ValueError, match="distinct class names"):
        evaluate(PROBS, TARGETS, ["a", "a", "b"])


# One class, positives at 0.91, 0.81, 0.31, 0.21, negatives at 0.71, 0.61, 0.51, 0.41, 0.11.
# Threshold  tp fp   P     R    F1          F2
#   0.81      2  0   1    .5   4/6         10/18
#   0.71      2  1  2/3   .5   4/7         10/19
#   0.21      4  4  1/2   1    8/12 (tie)  20/24 (best)
#   0.11      4  5  4/9   1    8/13        20/25
ONE_P = np.array([0.91, 0.81, 0.31, 0.21, 0.71, 0.61, 0.51, 0.41, 0.11])[:, None]
ONE_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])[:, None]


def test_each_rule_picks_the_obvious_threshold_and_ties_go_higher():
    # F1 ties at 0.81 and 0.21 (2/3 both): the higher one wins
    assert learn_thresholds(ONE_P, ONE_Y, "f1").tolist() == [0.81]
    assert learn_thresholds(ONE_P, ONE_Y, "f2").tolist() == [0.21]
    # precision 1/2 at 0.21 meets a 0.5 floor (>=) with full recall
    assert learn_thresholds(ONE_P, ONE_Y, "recall_at_precision", 0.5).tolist() == [0.21]
    # at a 0.6 floor, 0.81 and 0.71 both give recall 1/2: the higher wins
    assert learn_thresholds(ONE_P, ONE_Y, "recall_at_precision", 0.6).tolist() == [0.81]


def test_grid_lands_on_the_grid_with_the_same_predictions():
    assert GRID[0] == 0.05 and GRID[-1] == 0.95 and len(GRID) == 19
    assert learn_thresholds(ONE_P, ONE_Y, "f1", method="grid").tolist() == [0.80]
    assert learn_thresholds(ONE_P, ONE_Y, "f2", method="grid").tolist() == [0.20]
    for rule in ("f1", "f2"):
        on_probs = evaluate(ONE_P, ONE_Y, ["c"], learn_thresholds(ONE_P, ONE_Y, rule))
        on_grid = evaluate(ONE_P, ONE_Y, ["c"], learn_thresholds(ONE_P, ONE_Y, rule, method="grid"))
        assert on_probs["per_class"]["c"]["tp"] == on_grid["per_class"]["c"]["tp"]
        assert on_probs["per_class"]["c"]["fp"] == on_grid["per_class"]["c"]["fp"]
    # a positive scored below 0.05 is out of the grid's reach but not the curve's
    low_p, low_y = np.array([[0.03], [0.01], [0.02]]), np.array([[1], [0], [0]])
    assert learn_thresholds(low_p, low_y, "f1").tolist() == [0.03]
    assert learn_thresholds(low_p, low_y, "f1", method="grid").tolist() == [PREDICT_NOTHING]


def test_unreachable_floor_or_no_positives_predicts_nothing():
    # ranking neg, pos, neg, pos: precision never exceeds 1/2
    probs = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6]])
    targets = np.array([[0, 0], [1, 0], [0, 0], [1, 0]])
    thresholds = learn_thresholds(probs, targets, "recall_at_precision", 0.6)
    assert thresholds.tolist() == [PREDICT_NOTHING, PREDICT_NOTHING]
    assert PREDICT_NOTHING > 1.0
    assert not (np.ones((3, 2)) >= thresholds).any()  # even a probability of exactly 1.0
    for rule in ("f1", "f2"):
        assert learn_thresholds(probs, targets, rule)[1] == PREDICT_NOTHING
    report = evaluate(probs, targets, ["a", "b"], thresholds)
    assert report["per_class"]["a"]["tp"] + report["per_class"]["a"]["fp"] == 0
    assert report["per_class"]["a"]["recall"] == 0.0


def test_pr_curve_rule_matches_a_brute_force_over_sklearn_curve_points():
    rng = np.random.default_rng(0)
    for floor in (0.3, 0.5, 0.8):
        targets = (rng.random((300, 4)) < [0.05, 0.1, 0.3, 0.5]).astype(int)
        probs = np.round(np.clip(0.35 * targets + rng.random((300, 4)) * 0.7, 0, 1), 2)  # with ties
        learned = learn_thresholds(probs, targets, "recall_at_precision", floor)
        for i in range(4):
            precision, recall, thresholds = precision_recall_curve(targets[:, i], probs[:, i])
            ok = precision[:-1] >= floor
            best = recall[:-1][ok].max() if ok.any() else 0.0
            expected = thresholds[ok & (recall[:-1] == best)].max() if best > 0 else PREDICT_NOTHING
            assert learned[i] == expected


def test_thresholds_learned_on_validation_apply_unchanged_to_test():
    learned = learn_thresholds(ONE_P, ONE_Y, "f2")  # 0.21
    test_p = np.array([[0.25], [0.2], [0.22], [0.9], [0.05]])
    test_y = np.array([[1], [1], [0], [1], [0]])
    report = evaluate(test_p, test_y, ["c"], learned)
    assert report["thresholds"] == [0.21]
    c = report["per_class"]["c"]
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 1, 1, 1)  # 0.2 now falls just below
    # one class is one (N, 1) column, not sklearn's "binary" labels {0, 1}
    assert c["support"] == 3 and close(c["precision"], F(2, 3))


def test_unknown_rule_or_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="f1.*f2.*recall_at_precision"):
        learn_thresholds(ONE_P, ONE_Y, "youden")
    with pytest.raises(ValueError, match="pr_curve.*grid"):
        learn_thresholds(ONE_P, ONE_Y, "f1", method="quantile")


PREVALENCE = np.array([0.02, 0.05, 0.1, 0.2])


def imbalanced_targets(n: int = 2000, seed: int = 1) -> np.ndarray:
    targets = (np.random.default_rng(seed).random((n, len(PREVALENCE))) < PREVALENCE).astype(int)
    assert (targets.sum(0) > 0).all()
    return targets


def noisy_probs(targets: np.ndarray, signal: float, seed: int = 2) -> np.ndarray:
    logits = signal * (2 * targets - 1) + np.random.default_rng(seed).normal(size=targets.shape)
    return 1 / (1 + np.exp(-logits))


def test_guarded_macro_recall_cannot_be_won_by_predicting_everything_or_guessing():
    targets = imbalanced_targets()
    classes = list("abcd")
    always = np.ones(targets.shape)
    assert evaluate(always, targets, classes)["macro"]["recall"] == 1.0  # plain macro recall is fooled
    assert guarded_macro_recall(always, targets) == 0.0
    uniform = np.random.default_rng(3).random(targets.shape)
    assert evaluate(uniform, targets, classes)["macro"]["recall"] > 0.4
    assert guarded_macro_recall(uniform, targets) < 0.1
    assert guarded_macro_recall(targets.astype(float), targets) == 1.0


def test_guarded_macro_recall_grows_with_signal_and_equals_evaluate_at_learned_thresholds():
    targets = imbalanced_targets()
    weak, decent = noisy_probs(targets, 1.0), noisy_probs(targets, 1.5)
    scores = [guarded_macro_recall(p, targets) for p in (weak, decent)]
    assert 0.1 < scores[0] < scores[1] < 0.99
    for floor in (0.3, 0.5, 0.7):
        thresholds = learn_thresholds(decent, targets, "recall_at_precision", floor)
        report = evaluate(decent, targets, list("abcd"), thresholds)
        assert guarded_macro_recall(decent, targets, floor) == report["macro"]["recall"]
        # and, independently, the best recall over sklearn's curve points meeting the floor
        best = []
        for i in range(targets.shape[1]):
            precision, recall, _ = precision_recall_curve(targets[:, i], decent[:, i])
            best.append(recall[precision >= floor].max())
        assert guarded_macro_recall(decent, targets, floor) == pytest.approx(np.mean(best), rel=1e-12)


def test_guarded_macro_recall_skips_classes_absent_from_the_split():
    targets = imbalanced_targets()
    probs = noisy_probs(targets, 1.5)
    targets[:, 0] = 0
    rest = guarded_macro_recall(probs[:, 1:], targets[:, 1:])
    assert guarded_macro_recall(probs, targets) == pytest.approx(rest, rel=1e-12)
    with pytest.raises(ValueError, match="no class has positives"):
        guarded_macro_recall(probs, np.zeros_like(targets))


def test_per_class_table_lists_every_class_and_formats_numbers():
    report = evaluate(PROBS, TARGETS, CLASSES, THRESHOLDS)
    table = per_class_table(report, title="VAL METRICS")
    lines = table.splitlines()
    assert "VAL METRICS" in lines[1] and lines[0] == lines[-1] == "=" * len(lines[0])
    assert lines[3].split() == "Class Thresh Precision 95% CI Recall 95% CI F1 F2 AP AUC Support TP FP TN FN".split()
    rows = {line.split()[0]: line.split() for line in lines}
    # crack: precision 2/4, Wilson [0.150, 0.850]; recall 2/3, Wilson [0.208, 0.939] (see the Wilson test)
    assert rows["crack"] == ("crack 0.3500 0.5000 0.15-0.85 0.6667 0.21-0.94 "
                             "0.5714 0.6250 0.8667 0.7778 3 2 2 1 1").split()
    assert rows["rare"] == "rare 0.5000 0.0000 0.00-0.79 - - - - - - 0 0 1 5 0".split()
    assert rows["finger"][1:3] == ["0.2500", "0.7500"]
    macro = [line for line in lines if line.startswith("MACRO AVG")][0].split()
    micro = [line for line in lines if line.startswith("MICRO AVG")][0].split()
    interval = "-".join(f"{v:.2f}" for v in evaluate(PROBS, TARGETS, CLASSES, THRESHOLDS)["macro"]["recall_interval"])
    assert macro[2:] == ["0.6250", "0.8333", interval, "0.7143", f"{25 / 32:.4f}", "0.8917", "0.8333"]
    assert micro[2:] == ["0.5556", "0.8333", "0.6667", "0.7576", "6", "5", "4", "8", "1"]
    assert any("rare" in line and "MACRO" in line for line in lines[-3:])  # absent class is flagged
    assert all(len(line) == len(lines[0]) for line in lines[3:] if not line.startswith("no positives"))


def test_per_class_table_shows_never_for_a_class_that_predicts_nothing():
    report = evaluate(PROBS, TARGETS, CLASSES, [0.35, PREDICT_NOTHING, 0.5])
    row = [line for line in per_class_table(report).splitlines() if line.startswith("finger")][0]
    assert row.split()[1:3] == ["never", "0.0000"]
    assert "PER-CLASS METRICS" in per_class_table(report)


def wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> list[float]:
    """The Wilson score interval from its closed form: (k + z²/2 ± z·sqrt(k(n-k)/n + z²/4)) / (n + z²)."""
    centre, half = k + z * z / 2, z * np.sqrt(k * (n - k) / n + z * z / 4)
    return [(centre - half) / (n + z * z), (centre + half) / (n + z * z)]


@pytest.mark.parametrize("k, n", [(5, 6), (1, 1), (0, 3), (2, 4), (2, 3), (17, 40)])
def test_wilson_intervals_match_the_closed_form(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def test_wilson_for_a_rare_class_is_wide_and_none_without_positives():
    low, high = wilson_interval(5, 6)  # "recall 0.83" of a class with 6 validation images
    assert (round(low, 3), round(high, 3)) == (0.436, 0.970)
    assert wilson_interval(0, 0) is None


def test_evaluate_gives_each_class_its_wilson_intervals():
    report = evaluate(PROBS, TARGETS, CLASSES, THRESHOLDS)
    crack = report["per_class"]["crack"]
    assert crack["recall_interval"] == pytest.approx(wilson_by_hand(2, 3), abs=1e-12)
    assert crack["precision_interval"] == pytest.approx(wilson_by_hand(2, 4), abs=1e-12)
    rare = report["per_class"]["rare"]
    assert rare["recall_interval"] is None  # no positives: no recall, no interval
    assert rare["precision_interval"] == pytest.approx(wilson_by_hand(0, 1), abs=1e-12)
    never = evaluate(PROBS, TARGETS, CLASSES, [0.35, PREDICT_NOTHING, 0.5])["per_class"]["finger"]
    assert never["precision_interval"] is None  # never predicted: precision has no interval


def test_bootstrap_macro_recall_on_counts_worked_out_by_hand():
    # Two positive images of one class, one recalled. A draw of two images holds the recalled one
    # twice (recall 1, p = 1/4), the missed one twice (0, p = 1/4), or one of each (0.5, p = 1/2):
    # the 2.5th and 97.5th percentiles are 0 and 1.
    predicted, truth = np.array([[True], [False]]), np.array([[True], [True]])
    assert bootstrap_macro_recall(predicted, truth) == [0.0, 1.0]
    # Everything recalled: every draw's macro recall is 1.
    truth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    assert bootstrap_macro_recall(truth, truth) == [1.0, 1.0]
    assert bootstrap_macro_recall(np.zeros((3, 2), bool), np.zeros((3, 2), bool)) is None


def test_bootstrap_interval_holds_the_point_value_and_narrows_with_more_images():
    rng = np.random.default_rng(3)
    widths = []
    for n in (30, 3000):
        truth = rng.random((n, 3)) < 0.3
        predicted = truth & (rng.random((n, 3)) < 0.7)  # each positive recalled with p = 0.7
        report = evaluate(predicted.astype(float), truth.astype(int), list("abc"), 0.5)
        low, high = report["macro"]["recall_interval"]
        assert low <= report["macro"]["recall"] <= high
        assert bootstrap_macro_recall(predicted, truth) == [low, high]  # seeded: the same draws every time
        widths.append(high - low)
    assert widths[1] < widths[0] / 5  # about 1/sqrt(100) as wide
