"""Which images a dataset keeps (long-tail subsample) and which split each one lands in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LongTail:
    keep: list[int]  # indices into the input, ascending
    target: dict[str, int]  # positives per class the profile asks for
    kept: dict[str, int]  # positives per class actually kept


def long_tail_subsample(labels: list[tuple[str, ...]], classes: list[str], ratio: float, seed: int) -> LongTail:
    """Deterministic exponential subsample, as CIFAR-10-LT builds its long tail.

    Classes are ranked by frequency (ties by class order); the class of rank i is allowed
    `n_head * ratio ** (-i / (C - 1))` positives, so the head class keeps all it can and the
    rarest keeps 1/ratio of that. Multi-label images count for every class they carry, so classes
    are filled from the rarest target up, and a class never takes an image carrying a class that
    is already settled. The head class then cannot always keep all its images (those shared
    with rarer classes may be gone); `n_head` is lowered to what it kept and the profile redrawn,
    so the ratio holds exactly. Defect-free images are all kept.
    """
    if ratio < 1:
        raise ValueError(f"--long-tail ratio must be >= 1, got {ratio}")
    counts = {c: sum(c in item for item in labels) for c in classes}
    ranked = sorted((c for c in classes if counts[c] > 0), key=lambda c: (-counts[c], classes.index(c)))
    if not ranked:
        return LongTail(keep=list(range(len(labels))), target=dict.fromkeys(classes, 0), kept=dict.fromkeys(classes, 0))
    n_head = counts[ranked[0]]
    for _ in range(10):  # converges in two or three rounds: each round only lowers n_head
        steps = max(len(ranked) - 1, 1)
        target = {c: min(counts[c], max(1, round(n_head * ratio ** (-rank / steps)))) for rank, c in enumerate(ranked)}
        keep = _fill_targets(labels, classes, ranked, target, seed)
        kept = {c: sum(c in labels[i] for i in keep) for c in classes}
        if kept[ranked[0]] >= target[ranked[0]]:
            break
        n_head = kept[ranked[0]]
    return LongTail(keep=keep, target={c: target.get(c, 0) for c in classes}, kept=kept)


def _fill_targets(labels, classes, ranked, target, seed) -> list[int]:
    rng = np.random.default_rng(seed)
    decided: dict[int, bool] = {}
    settled: set[str] = set()
    for c in sorted(ranked, key=lambda c: (target[c], classes.index(c))):
        have = sum(1 for i, keep in decided.items() if keep and c in labels[i])
        pool = [i for i, item in enumerate(labels) if c in item and i not in decided and not settled.intersection(item)]
        chosen = set(rng.permutation(pool)[: max(target[c] - have, 0)].tolist())
        for i in pool:
            decided[i] = i in chosen
        settled.add(c)
    return [i for i, item in enumerate(labels) if not item or decided.get(i, False)]


def _stratified_pick(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about `fraction` of the rows, multi-label stratified (Sechidis et al. 2011)."""
    n = len(y)
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    if fraction >= 1:
        return np.ones(n, dtype=bool)
    count = min(max(int(round(fraction * n)), 1), n - 1) if n > 1 else 0
    if count == 0:
        return np.zeros(n, dtype=bool)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count, random_state=seed)
    _, picked = next(splitter.split(np.zeros((n, 1)), y))
    mask = np.zeros(n, dtype=bool)
    mask[picked] = True
    return mask


def stratified_split(y: np.ndarray, fractions: tuple[float, float, float], seed: int, guaranteed: int) -> np.ndarray:
    """Assign each row of the 0/1 matrix `y` (one row per group of images that must stay
    together) to train (0), val (1) or test (2).

    Iterative stratification over all columns of `y`; afterwards every one of the first
    `guaranteed` columns (the classes) with at least 3 positive rows gets at least one in val and
    in test (when their fractions are above 0), moved from the split that has most to spare.
    Stable for a given seed.
    """
    y = np.asarray(y, dtype=np.int64)
    train_f, val_f, test_f = fractions
    split = np.zeros(len(y), dtype=np.int64)
    test = _stratified_pick(y, test_f, seed)
    split[test] = 2
    rest = np.flatnonzero(~test)
    val_share = val_f / (train_f + val_f) if train_f + val_f > 0 else 0.0
    val = _stratified_pick(y[rest], val_share, seed + 1)
    split[rest[val]] = 1
    _guarantee_eval_positives(y[:, :guaranteed], split, wanted=[s for s, f in ((1, val_f), (2, test_f)) if f > 0])
    return split


def _guarantee_eval_positives(y: np.ndarray, split: np.ndarray, wanted: list[int]) -> None:
    totals = y.sum(axis=0)
    order = np.argsort(totals, kind="stable")  # rarest classes first: they have least to spare
    for _ in range(3):  # a move can only help other classes, so this settles in a pass or two
        moved = False
        for c in order:
            if totals[c] < 3:
                continue
            for target in wanted:
                per_split = np.array([y[split == s, c].sum() for s in range(3)])
                if per_split[target] > 0:
                    continue
                row = _row_to_move(y, split, c, target, per_split)
                if row is not None:
                    split[row] = target
                    moved = True
        if not moved:
            return


def _row_to_move(y: np.ndarray, split: np.ndarray, c: int, target: int, per_split: np.ndarray) -> int | None:
    """A row with class c from the split that has most of c, whose move leaves every class it
    carries still present where it was (for classes with 3+ rows); fewest labels first."""
    sources = [s for s in np.argsort(-per_split, kind="stable") if s != target and per_split[s] >= 2]
    totals = y.sum(axis=0)
    for source in sources:
        rows = np.flatnonzero((split == source) & (y[:, c] == 1))
        in_source = y[split == source].sum(axis=0)
        for row in sorted(rows, key=lambda r: (y[r].sum(), r)):
            carried = np.flatnonzero(y[row])
            if all(in_source[d] >= 2 or totals[d] < 3 for d in carried if d != c):
                return int(row)
    return None
