"""CPU augmentation (albumentations) on uint8 grayscale images, and multi-label MixUp.

Augmentation runs on the stored uint8 pixels, before normalisation, so CLAHE and noise see the
image as the camera gave it. The same functions serve the in-process loader, the training
worker and Ray Data's `map_batches`. The names a config may use are `core/augment_spec.py`.

albumentations and torch are imported where they are used: Ray starts many processes per trial,
and every one that unpickles a config would otherwise pay their import (docs/design.md).
"""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from defect_tune.core.augment_spec import parse_augment
from defect_tune.core.errors import UserError

if TYPE_CHECKING:
    import albumentations as A
    import torch


def _elastic(A, side: int):
    """Elastic deformation that moves pixels by about 1 % of the image's side (standard deviation)
    and varies over a twentieth of it. The displacement field is uniform noise in [-1, 1]
    (standard deviation 1/sqrt(3)), smoothed by a Gaussian of `sigma`, which divides its standard
    deviation by 2 sqrt(pi) sigma, times `alpha`. albumentations' own defaults (alpha 1, sigma 50),
    which the seeds used, move pixels by under 0.01 px: CPU spent on next to no change
    (results/benchmarks/augment.md)."""
    sigma = side / 20
    alpha = 0.01 * side * 2 * math.sqrt(math.pi) * sigma * math.sqrt(3)
    return A.ElasticTransform(alpha=alpha, sigma=sigma, noise_distribution="uniform", p=0.3)


# Probabilities follow the seeds' manufacturing pipelines: geometric flips often, photometric
# and distortion transforms sometimes, so most images still look like the line camera's. Each
# entry builds its transform from albumentations and the image's shorter side in pixels.
TRANSFORMS = {
    "hflip": lambda A, side: A.HorizontalFlip(p=0.5),
    "vflip": lambda A, side: A.VerticalFlip(p=0.5),
    "rot90": lambda A, side: A.RandomRotate90(p=0.5),
    "elastic": _elastic,
    "grid_distortion": lambda A, side: A.GridDistortion(num_steps=5, distort_limit=0.3, p=0.3),
    "clahe": lambda A, side: A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=0.3),
    "noise": lambda A, side: A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
    "blur": lambda A, side: A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    "coarse_dropout": lambda A, side: A.CoarseDropout(
        num_holes_range=(1, 8), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.3
    ),
}


def _albumentations():
    """albumentations, imported the way Ray Data's processes can afford.

    - Unless told not to, it asks pypi.org for a newer version when first imported: a request out
      of every Ray Data and training process, waiting up to its 2 s timeout where a factory network
      drops it. NO_ALBUMENTATIONS_UPDATE=1 is set unless the user set it.
    - Its package imports its torch helpers (ToTensorV2, unused here) when torch is installed, so a
      Ray Data process that only augments numpy images imported all of torch, several times the
      CPU and memory of the import without it. In a process that has not
      imported torch, `albumentations.pytorch` is held back during the package's import (it skips
      it on ImportError, as on an install without torch), then released: importing it later
      works as usual.
    """
    if "albumentations" in sys.modules:
        return sys.modules["albumentations"]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    hold_back = "torch" not in sys.modules and "albumentations.pytorch" not in sys.modules
    if hold_back:
        sys.modules["albumentations.pytorch"] = None  # an import of it raises ImportError
    try:
        import albumentations
    finally:
        if hold_back:
            del sys.modules["albumentations.pytorch"]
    return albumentations


def build_augmentation(spec: str, shape: tuple[int, int], seed: int) -> A.Compose | None:
    A = _albumentations()
    names = parse_augment(spec)
    if not names:
        return None
    if "rot90" in names and shape[0] != shape[1]:
        raise UserError(f"augment={spec!r}: rot90 needs square images; these are {shape[0]}x{shape[1]} "
                        "(use hflip/vflip)")
    return A.Compose([TRANSFORMS[name](A, min(shape)) for name in names], seed=seed)


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
