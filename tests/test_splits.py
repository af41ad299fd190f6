import numpy as np
import pytest

from defect_tune.data.splits import long_tail_subsample, stratified_split


def test_long_tail_follows_the_exponential_profile_single_label():
    classes = ["a", "b", "c", "d", "e"]
    labels = [(c,) for c in classes for _ in range(200)]
    result = long_tail_subsample(labels, classes, ratio=100, seed=0)
    # 200 * 100 ** (-i / 4): 200, 63, 20, 6, 2
    assert [result.kept[c] for c in classes] == [200, 63, 20, 6, 2]
    assert result.kept == result.target


def test_long_tail_multi_label_keeps_the_ratio_exactly_and_is_deterministic():
    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d"]
    labels = []
    for i in range(600):
        first = classes[i % 4]
        second = classes[rng.integers(4)] if rng.random() < 0.3 else first
        labels.append(tuple(sorted({first, second})))
    labels += [()] * 20
    result = long_tail_subsample(labels, classes, ratio=20, seed=3)
    assert result.kept == result.target
    kept = sorted(result.kept.values(), reverse=True)
    assert round(kept[0] / 20) == kept[-1]
    assert sum(1 for i in result.keep if not labels[i]) == 20  # defect-free images all kept
    assert long_tail_subsample(labels, classes, ratio=20, seed=3).keep == result.keep
    assert long_tail_subsample(labels, classes, ratio=20, seed=4).keep != result.keep


def test_long_tail_rejects_ratio_below_one():
    with pytest.raises(ValueError, match="long-tail"):
        long_tail_subsample([("a",)], ["a"], 0.5, 0)


def rare_heavy_matrix(seed=0):
    """Many rows of a frequent class, and several classes with exactly 3 positives."""
    rng = np.random.default_rng(seed)
    y = np.zeros((300, 8), dtype=np.int64)
    y[:, 0] = rng.random(300) < 0.6
    for c in range(1, 8):
        rows = rng.choice(300, size=3 if c > 3 else 30, replace=False)
        y[rows, c] = 1
    return y


def test_every_class_with_three_positives_reaches_val_and_test():
    y = rare_heavy_matrix()
    split = stratified_split(y, (0.7, 0.15, 0.15), seed=0, guaranteed=8)
    for c in range(8):
        for s in (0, 1, 2):
            assert y[split == s, c].sum() >= 1, (c, s)


def test_split_fractions_and_stratification():
    y = rare_heavy_matrix(1)
    split = stratified_split(y, (0.7, 0.15, 0.15), seed=0, guaranteed=8)
    shares = np.bincount(split, minlength=3) / len(split)
    assert np.allclose(shares, [0.7, 0.15, 0.15], atol=0.03)
    frequent = [y[split == s, 0].mean() for s in range(3)]
    assert max(frequent) - min(frequent) < 0.1  # class 0 prevalence about equal in every split


def test_split_is_stable_for_a_seed_and_changes_with_it():
    y = rare_heavy_matrix(2)
    first = stratified_split(y, (0.7, 0.15, 0.15), seed=5, guaranteed=8)
    assert np.array_equal(first, stratified_split(y, (0.7, 0.15, 0.15), seed=5, guaranteed=8))
    assert not np.array_equal(first, stratified_split(y, (0.7, 0.15, 0.15), seed=6, guaranteed=8))


def test_zero_test_fraction_puts_nothing_in_test():
    y = rare_heavy_matrix(3)
    split = stratified_split(y, (0.8, 0.2, 0.0), seed=0, guaranteed=8)
    assert (split != 2).all()
    assert all(y[split == 1, c].sum() >= 1 for c in range(8))
