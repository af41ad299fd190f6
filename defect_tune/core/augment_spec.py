"""The augmentation a training config names: presets and transform names, and how a spec such
as "hflip+clahe" parses. Plain names, so a config validates without albumentations; the
pipelines they build are `defect_tune/data/augment.py`."""

from __future__ import annotations

TRANSFORM_NAMES = ("hflip", "vflip", "rot90", "elastic", "grid_distortion", "clahe", "noise", "blur", "coarse_dropout")
PRESETS = {
    "none": (),
    "light": ("hflip", "vflip"),
    "standard": ("hflip", "vflip", "rot90", "noise", "blur"),
    "heavy": ("hflip", "vflip", "rot90", "elastic", "grid_distortion", "clahe", "noise", "blur", "coarse_dropout"),
}


def parse_augment(spec: str) -> tuple[str, ...]:
    """A preset name, or transform names joined by '+' ("hflip+clahe")."""
    if spec in PRESETS:
        return PRESETS[spec]
    names = tuple(name.strip() for name in spec.split("+") if name.strip())
    unknown = [name for name in names if name not in TRANSFORM_NAMES]
    if unknown or not names:
        raise ValueError(
            f"augment {spec!r}: unknown transform(s) {unknown}; use a preset {sorted(PRESETS)} "
            f"or '+'-joined names from {sorted(TRANSFORM_NAMES)}"
        )
    return names
