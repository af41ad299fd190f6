"""The versions a result records (sweep.json, an export, a model card), so that a model can be
traced to the code and libraries that trained it."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("defect-tune", "torch", "torchvision", "timm", "ray", "optuna", "albumentations", "numpy", "pyarrow")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
