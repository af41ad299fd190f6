"""CPU augmentation (albumentations) on uint8 grayscale images, and multi-label MixUp.

Augmentation runs on the stored uint8 pixels, before normalisation, so CLAHE and noise see the
image as the camera gave it. The same functions serve the in-process loader and Ray Data's
`map_batches`.

albumentations and torch are imported where they are used: Ray starts many processes per trial,
and every one that unpickles a config would otherwise pay their import (about 6 s of CPU).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import albumentations as A
    import torch

# Probabilities follow the seeds' manufacturing pipelines: geometric flips often, photometric
# and distortion transforms sometimes, so most images still look like the line camera's.
TRANSFORMS = {
    "hflip": lambda A: A.HorizontalFlip(p=0.5),
    "vflip": lambda A: A.VerticalFlip(p=0.5),
    "rot90": lambda A: A.RandomRotate90(p=0.5),
    "elastic": lambda A: A.ElasticTransform(alpha=1.0, sigma=50.0, p=0.3),
    "grid_distortion": lambda A: A.GridDistortion(num_steps=5, distort_limit=0.3, p=0.3),
    "clahe": lambda A: A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=0.3),
    "noise": lambda A: A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
    "blur": lambda A: A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    "coarse_dropout": lambda A: A.CoarseDropout(
        num_holes_range=(1, 8), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.3
    ),
}
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
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown or not names:
        raise ValueError(
            f"augment {spec!r}: unknown transform(s) {unknown}; use a preset {sorted(PRESETS)} "
            f"or '+'-joined names from {sorted(TRANSFORMS)}"
        )
    return names


def build_augmentation(spec: str, shape: tuple[int, int], seed: int) -> A.Compose | None:
    # albumentations asks pypi.org for a newer version when first imported, unless told not to:
    # a request out of every Ray Data and training process, up to a 2 s timeout each where a
    # factory network drops it. A user's own setting wins.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    names = parse_augment(spec)
    if not names:
        return None
    if "rot90" in names and shape[0] != shape[1]:
        raise ValueError(f"augment rot90 needs square images; these are {shape[0]}x{shape[1]} (use hflip/vflip)")
    return A.Compose([TRANSFORMS[name](A) for name in names], seed=seed)


def augment_batch(pipeline: A.Compose | None, images: np.ndarray) -> np.ndarray:
    """Augment a (N, H, W) uint8 batch image by image."""
    if pipeline is None:
        return images
    return np.stack([pipeline(image=image)["image"] for image in images])


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, labels: str, rng: np.random.Generator):
    """MixUp (Zhang et al. 2018) for multi-label targets.

    Images blend as `lam * x + (1 - lam) * x[perm]`. Targets, `soft`: blended the same way, so a
    defect present in one image is a partial positive. `union`: a defect in either image is a
    full positive, since a crack at 40 % opacity is still a crack to an inspector.
    """
    import torch

    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    mixed_x = lam * x + (1 - lam) * x[perm]
    mixed_y = torch.maximum(y, y[perm]) if labels == "union" else lam * y + (1 - lam) * y[perm]
    return mixed_x, mixed_y
