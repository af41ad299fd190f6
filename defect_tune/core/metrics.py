"""Multi-label evaluation, per-class thresholds and the guarded macro recall the search maximises.

One `evaluate` serves validation and test alike; thresholds are learned on validation with
`learn_thresholds` and passed unchanged to `evaluate` on test. numpy and scikit-learn only.

Undefined values are `None` (never NaN), so every report passes `json.dumps(..., allow_nan=False)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, roc_auc_score

THRESHOLD_RULES = ("f1", "f2", "recall_at_precision")
THRESHOLD_METHODS = ("pr_curve", "grid")
# A threshold above every probability: `probs >= PREDICT_NOTHING` is always False. It is what
# learn_thresholds returns for a class it cannot threshold usefully (see there).
PREDICT_NOTHING = float(np.nextafter(1.0, 2.0))
GRID = np.round(np.arange(1, 20) * 0.05, 2)  # 0.05, 0.10, ..., 0.95
CONFIDENCE = 0.95  # of every interval reported
BOOTSTRAP_SAMPLES = 1000
_BETA = {"f1": 1.0, "f2": 2.0}


def _check(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if probs.ndim != 2 or probs.shape != targets.shape or probs.shape[0] == 0:
        raise ValueError(f"probs and targets must be equal (N, C) arrays with N > 0, got {probs.shape} and "
                         f"{targets.shape}")
    if not np.all((probs >= 0) & (probs <= 1)):  # also rejects NaN; logits passed by mistake land here
        raise ValueError("probs must be sigmoid probabilities in [0, 1] (were logits passed?)")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    return probs, targets.astype(np.int64)


def _ratio(tp, other):
    """tp / (tp + other), 0 where that is 0/0: precision with other=fp (sklearn's
    zero_division=0 when nothing is predicted), recall with other=fn."""
    tp, other = np.asarray(tp, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return np.divide(tp, tp + other, out=np.zeros_like(tp), where=(tp + other) > 0)


def _fbeta(tp, fp, fn, beta: float):
    """(1+b²)TP / ((1+b²)TP + b²FN + FP): equals (1+b²)PR / (b²P + R), and is 0 when TP = 0.

    One division of exact integer sums, so equal scores compare equal (threshold ties are exact).
    """
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    b2 = beta * beta
    den = (1 + b2) * tp + b2 * fn + fp
    return np.divide((1 + b2) * tp, den, out=np.zeros_like(tp), where=den > 0)


def _mean(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return float(sum(defined) / len(defined)) if defined else None


def wilson_interval(successes: int, trials: int) -> list[float] | None:
    """The Wilson score interval (CONFIDENCE) of a proportion, e.g. a class's recall 5/6 ->
    [0.436, 0.970]; None when there are no trials. scipy's `binomtest(...).proportion_ci`."""
    if trials <= 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return [float(ci.low), float(ci.high)]


def bootstrap_macro_recall(predicted: np.ndarray, truth: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                           seed: int = 0) -> list[float] | None:
    """A percentile bootstrap interval (CONFIDENCE) of macro recall over images: images drawn
    with replacement, each draw's macro recall over the classes with positives in it (as
    `evaluate` averages). predicted, truth: (N, C) booleans. None when no class has positives.

    A draw is a multinomial count per image, so each draw's TP and positives per class are one
    matrix product; draws go in chunks to bound memory on large splits.
    """
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    n = truth.shape[0]
    if n == 0 or not truth.any():
        return None
    rng = np.random.default_rng(seed)
    hits, positives = (predicted & truth).astype(np.float64), truth.astype(np.float64)
    values = []
    for start in range(0, samples, 200):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(200, samples - start)).astype(np.float64)
        tp, pos = weights @ hits, weights @ positives
        recall = np.divide(tp, pos, out=np.zeros_like(tp), where=pos > 0)
        scored = (pos > 0).sum(axis=1)
        defined = scored > 0  # a draw of only negative images has no macro recall; it is left out
        values.append(recall[defined].sum(axis=1) / scored[defined])
    values = np.concatenate(values)
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def evaluate(
    probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], thresholds: np.ndarray | float = 0.5,
    intervals: bool = True,
) -> dict:
    """Per-class, macro and micro scores of `probs >= thresholds` against `targets`.

    probs (N, C) sigmoid probabilities, targets (N, C) 0/1, thresholds a scalar or one per class.
    Per class: threshold, precision, recall, f1, f2 at the threshold; average_precision and roc_auc
    from the probabilities (threshold-free); tp, fp, tn, fn, support (= tp + fn).

    Conventions (None is "undefined"):
    - precision is 0.0 when the class is never predicted (sklearn's zero_division=0).
    - a class with no positives here (support 0) cannot be recalled: its recall, f1 and f2 are
      None, and it is left out of every macro mean of precision/recall/f1/f2 and listed in
      `classes_without_support`. Scoring it 0 would punish the model for the split, not itself.
    - average_precision and roc_auc are None for a class with no positives or no negatives;
      their macro means run over the classes where they are defined (None if there are none).
    - micro scores pool TP/FP/TN/FN over classes; micro recall is None if no positives at all.

    Intervals (CONFIDENCE, [low, high]; None where the figure is undefined): per class,
    `recall_interval` (Wilson, tp of support) and `precision_interval` (Wilson, tp of tp + fp;
    None when the class is never predicted); macro `recall_interval` by bootstrap over images.
    With 1-6 positives of a rare class, the interval, not the point value, is what to read.
    `intervals=False` skips the bootstrap (macro `recall_interval` None) where nobody reads it.
    """
    probs, targets = _check(probs, targets)
    n, c = probs.shape
    classes = [str(name) for name in classes]
    if len(classes) != c or len(set(classes)) != c:
        raise ValueError(f"need {c} distinct class names, got {classes}")
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (c,)).copy()
    if not np.all(np.isfinite(thr)):
        raise ValueError(f"thresholds must be finite, got {thr.tolist()}")

    # Counted directly rather than with sklearn's multilabel_confusion_matrix, which reads a
    # single (N, 1) column as binary labels {0, 1} and returns a matrix per label value.
    pred, truth = probs >= thr, targets == 1
    tp, fp = (pred & truth).sum(0), (pred & ~truth).sum(0)
    fn, tn = (~pred & truth).sum(0), (~pred & ~truth).sum(0)
    support = tp + fn
    precision, recall = _ratio(tp, fp), _ratio(tp, fn)
    f1, f2 = _fbeta(tp, fp, fn, 1.0), _fbeta(tp, fp, fn, 2.0)

    per_class = {}
    for i, name in enumerate(classes):
        has_pos = bool(support[i] > 0)
        both = has_pos and support[i] < n
        per_class[name] = {
            "threshold": float(thr[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]) if has_pos else None,
            "f1": float(f1[i]) if has_pos else None,
            "f2": float(f2[i]) if has_pos else None,
            "average_precision": float(average_precision_score(targets[:, i], probs[:, i])) if both else None,
            "roc_auc": float(roc_auc_score(targets[:, i], probs[:, i])) if both else None,
            "tp": int(tp[i]), "fp": int(fp[i]), "tn": int(tn[i]), "fn": int(fn[i]),
            "support": int(support[i]),
            "recall_interval": wilson_interval(tp[i], support[i]),
            "precision_interval": wilson_interval(tp[i], tp[i] + fp[i]),
        }

    scored = [row for row in per_class.values() if row["support"] > 0]
    macro = {key: _mean([row[key] for row in scored]) for key in ("precision", "recall", "f1", "f2")}
    for key in ("average_precision", "roc_auc"):
        macro[key] = _mean([row[key] for row in per_class.values()])
    macro["recall_interval"] = bootstrap_macro_recall(pred, truth) if intervals else None
    TP, FP, TN, FN = (int(x.sum()) for x in (tp, fp, tn, fn))
    micro = {
        "precision": float(_ratio(TP, FP)),
        "recall": float(_ratio(TP, FN)) if TP + FN > 0 else None,
        "f1": float(_fbeta(TP, FP, FN, 1.0)),
        "f2": float(_fbeta(TP, FP, FN, 2.0)),
        "tp": TP, "fp": FP, "tn": TN, "fn": FN, "support": TP + FN,
    }
    return {
        "samples": int(n),
        "thresholds": [float(t) for t in thr],
        "per_class": per_class,
        "macro": macro,
        "micro": micro,
        "hamming_loss": (FP + FN) / (n * c),
        "classes_without_support": [name for name, row in per_class.items() if row["support"] == 0],
    }


def learn_thresholds(
    probs: np.ndarray,
    targets: np.ndarray,
    rule: str = "recall_at_precision",
    precision_floor: float = 0.5,
    method: str = "pr_curve",
) -> np.ndarray:
    """One threshold per class, learned on validation, to be applied unchanged on test.

    Candidates: method "pr_curve" tries every distinct probability of the class (exactly the
    thresholds of sklearn's precision_recall_curve, so no threshold can do better); "grid" tries
    0.05, 0.10, ..., 0.95. Rules: "f1" / "f2" maximise that score; "recall_at_precision"
    maximises recall among candidates with precision >= precision_floor. Ties go to the higher
    threshold (same score, fewer false alarms).

    A class with no positives, or where no candidate scores above 0 (for recall_at_precision:
    none reaches the floor), gets PREDICT_NOTHING (1.0 + 1 ulp), so `probs >= t` is always False
    and the class is never predicted: the fewest false alarms for the same zero score.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; valid rules are {THRESHOLD_RULES}")
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; valid methods are {THRESHOLD_METHODS}")
    if not 0 <= precision_floor <= 1:
        raise ValueError(f"precision_floor must be in [0, 1], got {precision_floor}")
    probs, targets = _check(probs, targets)

    thresholds = np.full(probs.shape[1], PREDICT_NOTHING)
    for i in range(probs.shape[1]):
        p, y = probs[:, i], targets[:, i]
        pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
        if pos.size == 0:
            continue
        candidates = np.unique(p) if method == "pr_curve" else GRID  # ascending
        # images with p >= t, counted by binary search: exact, and O(N log N) for all candidates
        tp = pos.size - np.searchsorted(pos, candidates, side="left")
        fp = neg.size - np.searchsorted(neg, candidates, side="left")
        fn = pos.size - tp
        if rule == "recall_at_precision":
            score = np.where(_ratio(tp, fp) >= precision_floor, tp / pos.size, 0.0)
        else:
            score = _fbeta(tp, fp, fn, _BETA[rule])
        best = score.max()
        if best > 0:
            thresholds[i] = candidates[np.flatnonzero(score == best)[-1]]  # last = highest threshold
    return thresholds


def guarded_macro_recall(probs: np.ndarray, targets: np.ndarray, precision_floor: float = 0.5) -> float:
    """THE search objective: validation macro recall, guarded so that predicting every defect
    everywhere cannot win.

    For each class with positives in `targets`: the highest recall reachable at any threshold
    whose precision on these same images is >= precision_floor, or 0 if no threshold reaches the
    floor. The mean over those classes (classes absent from the split are left out, as in
    `evaluate`). Defined as the macro recall of `evaluate` at `learn_thresholds(...,
    "recall_at_precision", precision_floor)`, and computed exactly that way.

    Why it is guarded: a constant predictor (e.g. all probabilities 1.0) has precision equal to
    the class prevalence at every threshold, so it scores 0 on every class rarer than the floor.
    A random ranking has precision near prevalence at every depth, so it scores near 0 (only a
    few lucky top-ranked hits). Plain macro recall at 0.5 would give both of them up to 1.0.

    The thresholds are fit to the images they are scored on, so this is optimistic as an
    estimate of test recall; it ranks trials, it does not report a result. Raises ValueError
    when no class has positives (the objective is undefined).
    """
    probs, targets = _check(probs, targets)
    classes = [str(i) for i in range(probs.shape[1])]
    thresholds = learn_thresholds(probs, targets, "recall_at_precision", precision_floor, "pr_curve")
    recall = evaluate(probs, targets, classes, thresholds, intervals=False)["macro"]["recall"]
    if recall is None:
        raise ValueError("no class has positives in these targets: macro recall is undefined")
    return recall


def per_class_table(report: dict, title: str = "") -> str:
    """A fixed-width table of an `evaluate` report: one row per class, then MACRO and MICRO AVG.

    Undefined values print as "-", a PREDICT_NOTHING threshold as "never", intervals as
    "low-high" (95 %: Wilson per class, bootstrap for the macro recall).
    """
    columns = [("Thresh", 8), ("Precision", 11), ("95% CI", 11), ("Recall", 9), ("95% CI", 11), ("F1", 8), ("F2", 8),
               ("AP", 8), ("AUC", 8), ("Support", 9), ("TP", 7), ("FP", 7), ("TN", 7), ("FN", 7)]
    name_width = max(len("MACRO AVG"), *(len(n) for n in report["per_class"])) + 2

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        if isinstance(value, int):
            return str(value)
        if isinstance(value, list):
            return f"{value[0]:.2f}-{value[1]:.2f}"
        return "never" if value > 1 else f"{value:.4f}"

    def row(name: str, values: list) -> str:
        return name.ljust(name_width) + "".join(cell(v).rjust(w) for v, (_, w) in zip(values, columns))

    keys = ["threshold", "precision", "precision_interval", "recall", "recall_interval", "f1", "f2",
            "average_precision", "roc_auc", "support", "tp", "fp", "tn", "fn"]
    macro, micro = report["macro"], report["micro"]
    width = name_width + sum(w for _, w in columns)
    lines = ["=" * width, title or "PER-CLASS METRICS", "=" * width,
             "Class".ljust(name_width) + "".join(h.rjust(w) for h, w in columns), "-" * width]
    lines += [row(name, [r[k] for k in keys]) for name, r in report["per_class"].items()]
    lines.append("-" * width)
    lines.append(row("MACRO AVG", ["", macro["precision"], "", macro["recall"], macro.get("recall_interval")]
                     + [macro[k] for k in keys[5:9]] + [""] * 5))
    lines.append(row("MICRO AVG", ["", micro["precision"], "", micro["recall"], "", micro["f1"], micro["f2"], "", ""]
                     + [micro[k] for k in keys[9:]]))
    if report["classes_without_support"]:
        lines.append("no positives in this split (left out of MACRO AVG): "
                     f"{', '.join(report['classes_without_support'])}")
    lines.append("=" * width)
    return "\n".join(lines)
