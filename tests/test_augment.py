import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_tune.core.augment_spec import PRESETS, TRANSFORM_NAMES, parse_augment
from defect_tune.data.augment import TRANSFORMS, augment_batch, build_augmentation, mixup


def test_presets_and_joined_names():
    assert parse_augment("light") == ("hflip", "vflip")
    assert parse_augment("hflip+clahe") == ("hflip", "clahe")
    with pytest.raises(ValueError, match="warp"):
        parse_augment("hflip+warp")


def test_every_name_a_config_may_use_builds_a_transform():
    """The config validates against the names (no albumentations); each builds a transform."""
    assert list(TRANSFORMS) == list(TRANSFORM_NAMES)
    assert {name for preset in PRESETS.values() for name in preset} <= set(TRANSFORM_NAMES)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_keeps_shape_and_dtype(preset):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    out = augment_batch(build_augmentation(preset, (32, 32), seed=0), images)
    assert out.shape == images.shape and out.dtype == np.uint8
    if preset == "none":
        assert out is images


def test_augmentation_is_seeded():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8)
    a = augment_batch(build_augmentation("heavy", (32, 32), seed=3), images)
    b = augment_batch(build_augmentation("heavy", (32, 32), seed=3), images)
    c = augment_batch(build_augmentation("heavy", (32, 32), seed=4), images)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, images)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_changes_a_textured_image_when_it_fires(name):
    """Each transform, made to fire, changes a textured frame by at least 2 grey levels on
    average: none is configured into a no-op (as `elastic` was with albumentations' defaults)."""
    side = 64
    y, x = np.mgrid[0:side, 0:side]
    texture = np.sin(x / 3.0) * np.cos(y / 5.0) * 50 + 100 + np.random.default_rng(0).normal(0, 10, (side, side))
    image = np.clip(texture, 0, 255).astype(np.uint8)
    pipeline = build_augmentation(name, (side, side), seed=0)
    pipeline.transforms[0].p = 1.0
    changes = [np.abs(augment_batch(pipeline, image[None])[0].astype(float) - image).mean() for _ in range(5)]
    assert np.mean(changes) > 2.0


@pytest.mark.parametrize("side", [64, 224])
def test_elastic_moves_pixels_by_about_one_percent_of_the_side(side):
    """On a horizontal ramp (grey level proportional to x), bilinear resampling turns each pixel's
    horizontal displacement into its change of grey level. albumentations' default elastic
    parameters (the seeds') moved pixels by under 0.01 px, doing nothing for 11 ms an image."""
    scale = 255 // side
    ramp = np.tile((np.arange(side) * scale).astype(np.uint8), (side, 1))
    pipeline = build_augmentation("elastic", (side, side), seed=0)
    pipeline.transforms[0].p = 1.0  # always, here
    inner = slice(side // 8, -side // 8)  # away from the border, where the fill comes in
    moved = [np.abs(augment_batch(pipeline, ramp[None])[0].astype(float) - ramp)[inner, inner].mean() / scale
             for _ in range(5)]
    assert 0.004 * side < np.mean(moved) < 0.02 * side


def test_rot90_refuses_non_square_frames():
    with pytest.raises(ValueError, match="square"):
        build_augmentation("standard", (32, 200), seed=0)
    assert build_augmentation("light", (32, 200), seed=0) is not None


def test_mixup_soft_and_union_targets():
    x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rng = np.random.default_rng(0)
    mixed_x, soft = mixup(x, y, 0.4, "soft", np.random.default_rng(0))
    lam = np.random.default_rng(0).beta(0.4, 0.4)
    perm = rng.permutation  # same draws as inside mixup: beta first, then the permutation
    rng.beta(0.4, 0.4)
    order = perm(2)
    assert torch.allclose(mixed_x, lam * x + (1 - lam) * x[order])
    assert torch.allclose(soft, lam * y + (1 - lam) * y[order])
    _, union = mixup(x, y, 0.4, "union", np.random.default_rng(0))
    assert torch.equal(union, torch.maximum(y, y[order]))


def test_a_ray_data_process_augments_without_asking_for_updates_or_importing_torch():
    """albumentations checks pypi.org for a newer version on import unless NO_ALBUMENTATIONS_UPDATE
    is set, and imports torch for its ToTensorV2 when torch is installed; a Ray Data process that
    only augments (no torch yet) needs neither. The images come out as in a process with torch."""
    probe = (
        "import os, sys, urllib.request\n"
        "import numpy as np\n"
        "asked = []\n"
        "def refuse(opener, url, *args, **kwargs):\n"
        "    asked.append(getattr(url, 'full_url', url))\n"
        "    raise OSError('offline')\n"
        "urllib.request.OpenerDirector.open = refuse\n"
        "{build}\n"
        "print(asked, os.environ.get('NO_ALBUMENTATIONS_UPDATE'), 'torch' in sys.modules)\n"
    )
    build = ("from defect_tune.data.augment import augment_batch, build_augmentation\n"
             "images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)\n"
             "out = augment_batch(build_augmentation('heavy', (32, 32), seed=3), images)\n"
             "np.save(sys.argv[1], out)\n"
             "torch_free = 'torch' not in sys.modules\n"
             "from albumentations.pytorch import ToTensorV2  # still importable afterwards\n"
             "print('torch-free:', torch_free)")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    saved = Path(tempfile.mkdtemp()) / "augmented.npy"
    result = subprocess.run([sys.executable, "-c", probe.format(build=build), str(saved)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch-free:", "True", "[]", "1", "True"]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    assert np.array_equal(np.load(saved), augment_batch(build_augmentation("heavy", (32, 32), seed=3), images))
    # The probe sees the request, and torch, when albumentations is imported plainly.
    plain = subprocess.run([sys.executable, "-c", probe.format(build="import albumentations")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert "pypi.org" in plain.stdout and plain.stdout.split()[-1] == "True", plain.stdout + plain.stderr
