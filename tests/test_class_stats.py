import math

import pytest

from defect_tune.core.class_stats import ClassCounts, class_weights
from defect_tune.core.errors import UserError

COUNTS = ClassCounts(positives={"crack": 100, "finger": 20, "rare": 4}, total=500)


def test_exponent_zero_is_unweighted():
    assert class_weights(COUNTS, 0) == {"crack": 1.0, "finger": 1.0, "rare": 1.0}


def test_full_inverse_ratio_and_square_root():
    full = class_weights(COUNTS, 1)
    assert full == {"crack": 4.0, "finger": 24.0, "rare": 124.0}
    root = class_weights(COUNTS, 0.5)
    assert root["crack"] == 2.0
    assert math.isclose(root["finger"], math.sqrt(24))
    assert math.isclose(root["rare"], math.sqrt(124))


def test_overrides_replace_a_class_weight_as_the_el_seed_did_for_crack():
    weights = class_weights(COUNTS, 0.5, overrides={"crack": 1.5})
    assert weights["crack"] == 1.5
    assert math.isclose(weights["finger"], math.sqrt(24))


def test_unknown_override_negative_exponent_and_empty_class_are_errors():
    with pytest.raises(UserError, match="class_weight_overrides: .* unknown classes"):  # bad input: one line
        class_weights(COUNTS, 0.5, overrides={"crak": 1.0})
    with pytest.raises(UserError, match="class_weight_exponent: .*exponent"):
        class_weights(COUNTS, -1)
    empty = ClassCounts(positives={"a": 3, "b": 0}, total=10)
    with pytest.raises(UserError, match="'b' has 0 positives"):
        class_weights(empty, 0.5)
    assert class_weights(empty, 0.5, overrides={"b": 1.0})["b"] == 1.0


def test_counts_from_meta_sum_the_requested_splits():
    meta = {
        "classes": ["a", "b"],
        "splits": {
            "train": {"images": 10, "positives": {"a": 4, "b": 1}},
            "val": {"images": 5, "positives": {"a": 1, "b": 1}},
            "test": {"images": 5, "positives": {"a": 2, "b": 0}},
        },
    }
    assert ClassCounts.from_meta(meta) == ClassCounts({"a": 4, "b": 1}, 10)
    assert ClassCounts.from_meta(meta, ("train", "val")) == ClassCounts({"a": 5, "b": 2}, 15)
