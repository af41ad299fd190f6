"""Class statistics and the positive-class weights that imbalance handling is built on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from defect_tune.core.errors import UserError


@dataclass(frozen=True)
class ClassCounts:
    """Positives per class among `total` images (one split, or several added up)."""

    positives: dict[str, int]
    total: int

    @classmethod
    def from_meta(cls, meta: Mapping, splits: tuple[str, ...] = ("train",)) -> ClassCounts:
        """Counts from a prepared dataset's meta.json, summed over `splits`."""
        positives = {c: sum(meta["splits"][s]["positives"][c] for s in splits) for c in meta["classes"]}
        return cls(positives=positives, total=sum(meta["splits"][s]["images"] for s in splits))


def class_weights(
    counts: ClassCounts, exponent: float, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Weight of each class's positives: `w_c = ((N - P_c) / P_c) ** exponent`.

    exponent 0 is unweighted, 0.5 the square-root weighting of the EL seed, 1 the full
    negative/positive ratio (BCE's usual `pos_weight`). `overrides` set a class's weight outright,
    as the EL seed lowered crack from 1.9 to 1.5 because crack is frequent but ambiguous.
    A class with no positives has no defined weight: override it or leave it out of training.
    Each of these is the user's config or data, so a UserError naming the key.
    """
    if exponent < 0:
        raise UserError(f"class_weight_exponent: class-weight exponent must be >= 0, got {exponent}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(counts.positives))
    if unknown:
        raise UserError(f"class_weight_overrides: class-weight overrides name unknown classes {unknown}; "
                        f"classes are {sorted(counts.positives)}")
    weights = {}
    for name, positives in counts.positives.items():
        if name in overrides:
            if overrides[name] < 0:
                raise UserError(f"class_weight_overrides: class-weight override for {name!r} must be >= 0, got "
                                f"{overrides[name]}")
            weights[name] = float(overrides[name])
        elif not 0 < positives <= counts.total:
            raise UserError(
                f"class {name!r} has {positives} positives among {counts.total} training images: "
                "its weight is undefined; give it an override (class_weight_overrides) or prepare a larger train split"
            )
        else:
            weights[name] = float(((counts.total - positives) / positives) ** exponent)
    return weights
