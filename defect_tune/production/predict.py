"""`defect-tune predict`: a model directory's per-class probabilities and decisions for images.

Each image goes through `prepare`'s own decode and fit (the model directory records which), so a
model sees at inference exactly what it saw in training. A source that `prepare` would tile
becomes several tiles; the image's probability for a class is its highest tile's.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from defect_tune.core.errors import UserError, check_writable, file_in_the_way
from defect_tune.data.files import file_problem, walk_files
from defect_tune.data.images import decode_or_reason
from defect_tune.data.readers import IMAGE_SUFFIXES, Item
from defect_tune.data.shards import to_tensor
from defect_tune.production.model_dir import load_model, read_model_info


class PredictError(UserError):
    """Inputs that cannot be predicted at all; the message names them."""


# The start of a row's error when the model gave a probability that is not a number (NaN weights,
# an overflow): the command line finds those rows by it and exits non-zero.
NON_FINITE = "the model gave a non-finite probability (NaN or infinity)"


def non_finite_error(table: pd.DataFrame, out: Path | None, model_dir: Path) -> PredictError | None:
    """The error for predictions where the model gave non-finite probabilities, or None. Raised
    after the CSV is written: the rows say which images, and exit 2 says the run is not usable."""
    broken = table["error"].fillna("").str.startswith(NON_FINITE)
    if not broken.any():
        return None
    rows = f"their rows in {out}" if out is not None else "their rows"
    return PredictError(f"{model_dir}: {NON_FINITE} for {int(broken.sum())} of {len(table)} image(s), "
                        f"e.g. {table.loc[broken, 'path'].iloc[0]}; {rows} say so in 'error' and carry no decisions; "
                        "predictions from this model cannot be trusted (check the model's weights for NaN)")


def check_predictions_out(out: Path) -> None:
    """Refuse an --out that predictions cannot be written to, or that is a file other than an
    earlier predictions CSV."""
    out = Path(out)
    if out.is_dir():
        raise PredictError(f"{out}: --out is a folder; name the CSV to write, e.g. {out / 'preds.csv'}")
    if (blocker := file_in_the_way(out)) is not None:
        raise PredictError(f"{out}: --out lies under {blocker}, which is a file")
    if out.exists():
        with open(out, "rb") as handle:
            first = handle.readline()
        if not first.startswith(b"path,"):
            raise PredictError(f"{out}: exists and is not an earlier predictions CSV; refusing to overwrite it")
    check_writable(out.parent, "--out")


def expand(inputs: list[str]) -> list[Path]:
    """Files, folders (searched recursively, through symlinked folders) and globs, in the order
    given, each once. A folder's files that are not images are kept too, and so are its entries
    that are no readable file (dangling links, FIFOs, devices): each becomes a row saying so,
    rather than vanishing; hidden files (".DS_Store") are left out. A file reached twice through
    links is predicted once, under its first path."""
    found: dict[Path, None] = {}
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            walk = walk_files(path)
            listed = sorted([*walk.files, *(p for p, _ in walk.problems if not p.is_dir())])  # not: a link up the tree
            matches = [p for p in listed if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in matches):
                raise PredictError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif os.path.lexists(path):  # a file, or a FIFO or dangling link named directly: its row says which
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if not Path(p).is_dir())
            if not matches:
                raise PredictError(f"{text}: no such file, folder or matching glob")
        found.update(dict.fromkeys(matches))
    return list(found)


def _tta_views(x: torch.Tensor, tta: bool) -> list[torch.Tensor]:
    return [x, torch.flip(x, dims=[-1]), torch.flip(x, dims=[-2])] if tta else [x]


@torch.no_grad()
def _probabilities(model, images: np.ndarray, device: torch.device, tta: bool) -> np.ndarray:
    x = to_tensor(images).to(device)
    views = [torch.sigmoid(model(view)).float() for view in _tta_views(x, tta)]
    return torch.stack(views).mean(0).cpu().numpy()  # TTA: the mean over the flips


def _onnx_probabilities(model, images: np.ndarray, tta: bool) -> np.ndarray:
    views = [images, images[:, :, ::-1], images[:, ::-1, :]] if tta else [images]  # as _tta_views
    return np.mean([model.probabilities(np.ascontiguousarray(view)) for view in views], axis=0)


def _runtime(model_dir: Path, runtime: str, device: str):
    """(probabilities(images, tta), model.json) for the chosen runtime."""
    if runtime == "onnx":
        from defect_tune.production.onnx_model import ONNX_FILE, OnnxModel

        info = read_model_info(model_dir)
        path = Path(model_dir) / ONNX_FILE
        if not path.is_file():
            why = info.get("onnx", {}).get("error", "the model directory predates ONNX export; retrain writes one")
            raise PredictError(f"{path}: not found ({why}); use --runtime torch")
        model = OnnxModel(path)
        model.check_classes(info["classes"], Path(model_dir) / "model.json")
        return (lambda images, tta: _onnx_probabilities(model, images, tta)), info
    if runtime != "torch":
        raise PredictError(f"--runtime {runtime!r}: choose torch or onnx")
    from defect_tune.training.engine import pick_device

    target = pick_device(device)
    model, info = load_model(model_dir, target)
    return (lambda images, tta: _probabilities(model, images, target, tta)), info


def _decoded(paths: list[Path], size: int, fit: str, shape: tuple[int, int],
             bit_depth: int | None = None) -> Iterator[tuple[Path, np.ndarray | str]]:
    for path in paths:
        if (problem := file_problem(path)) is not None:
            yield path, problem
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            yield path, f"not an image file (suffix {path.suffix or 'none'}); images are {', '.join(IMAGE_SUFFIXES)}"
            continue
        result = decode_or_reason((Item(id=str(path), path=path, labels=()), size, fit, bit_depth))
        if isinstance(result, str):
            yield path, result
            continue
        tiles = np.stack([output.pixels for output in result.outputs]) if result.outputs else None
        if tiles is None or tiles.shape[1:] != shape:
            got = "no pixels" if tiles is None else f"{tiles.shape[1]}x{tiles.shape[2]}"
            yield path, (f"fits to {got}, the model takes {shape[0]}x{shape[1]} (fit {fit}); "
                         "prepare-time aspect ratio differs")
            continue
        yield path, tiles


def predict_to_csv(model_dir: Path, inputs: list[str], out: Path, **options) -> pd.DataFrame:
    """`defect-tune predict`: `predict_images` written to the CSV `out` (checked before the work,
    which a bad `out` would otherwise lose). Raises PredictError after writing when the model gave
    non-finite probabilities: the rows say which images, and nothing may read them as "no defect"."""
    check_predictions_out(out)
    table = predict_images(model_dir, inputs, **options)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    if (error := non_finite_error(table, out, model_dir)) is not None:
        raise error
    return table


def predict_images(model_dir: Path, inputs: list[str], batch_size: int = 64, tta: bool = False,
                   device: str = "auto", runtime: str = "torch") -> pd.DataFrame:
    """One row per image: path, tiles, prob/<class>, pred/<class>, defects, error. `runtime`:
    torch (the safetensors weights, on `device`) or onnx (model.onnx under onnxruntime, CPU)."""
    if batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, got {batch_size}")
    probabilities, info = _runtime(model_dir, runtime, device)
    classes, thresholds = info["classes"], np.array([info["thresholds"][c] for c in info["classes"]])
    pre = info["preprocessing"]
    paths = expand(inputs)
    rows: list[dict] = []
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        stacked = np.concatenate([tiles for _, tiles in pending])
        probs = np.concatenate([probabilities(stacked[i : i + batch_size], tta)
                                for i in range(0, len(stacked), batch_size)])
        start = 0
        for path, tiles in pending:
            image_probs = probs[start : start + len(tiles)].max(axis=0)  # a defect in any tile is in the image
            start += len(tiles)
            broken = [c for c, p in zip(classes, image_probs) if not np.isfinite(p)]
            if broken:  # NaN >= threshold is False: it would read as "no defect"
                rows.append({"path": str(path), "tiles": len(tiles),
                             **{f"prob/{c}": float(p) for c, p in zip(classes, image_probs)},
                             "error": f"{NON_FINITE} for {broken}: no decision given"})
                continue
            decisions = image_probs >= thresholds
            rows.append({"path": str(path), "tiles": len(tiles),
                         **{f"prob/{c}": float(p) for c, p in zip(classes, image_probs)},
                         **{f"pred/{c}": int(d) for c, d in zip(classes, decisions)},
                         "defects": ";".join(c for c, d in zip(classes, decisions) if d), "error": None})
        pending.clear()

    for path, tiles in _decoded(paths, pre["image_size"], pre["fit"], (pre["height"], pre["width"]),
                                pre.get("bit_depth")):
        if isinstance(tiles, str):  # kept, with the reason: nothing is silently dropped
            rows.append({"path": str(path), "tiles": 0, "error": tiles})
            continue
        pending.append((path, tiles))
        if sum(len(t) for _, t in pending) >= batch_size:
            flush()
    flush()
    columns = ["path", "tiles", *(f"prob/{c}" for c in classes), *(f"pred/{c}" for c in classes), "defects", "error"]
    order = {str(p): i for i, p in enumerate(paths)}
    board = pd.DataFrame(rows, columns=columns)
    board = board.astype({"tiles": "Int64", **{f"pred/{c}": "Int64" for c in classes}})  # empty, not NaN, on errors
    return board.sort_values("path", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
