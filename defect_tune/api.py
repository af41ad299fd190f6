"""The Python API, for notebooks and scripts: the same steps as the command line.

    from defect_tune import api

    data = api.prepare("data/synthetic-voc", "data/synthetic", format="synthetic", image_size=32, synthetic_images=300)
    summary = api.search(data, space="quick", name="notebook", out="results/notebook", epochs=1, num_samples=2)
    board = api.leaderboard("results/notebook")            # a pandas DataFrame, best first
    print(board[["trial_id", summary["objective"], "epochs"]].head())
    config = api.best_config("results/notebook")           # the winner's TrainConfig
    config = api.load_config(None, lr=3e-4, epochs=10)     # or a config of your own
    page = api.report("results/notebook")                  # results/notebook/report/report.html
    exported = api.export("results/notebook", "results/notebook/best.yaml")
    model = api.retrain("results/notebook/best.yaml", data, "models/notebook")  # weights, model.onnx, card
    preds = api.predict(model, ["data/synthetic-voc/JPEGImages"], out="preds.csv")  # a DataFrame, also written

Every function raises the command line's errors (`defect_tune.core.errors.UserError`
subclasses) where the command would print one line and exit 2.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from defect_tune.core.config import TrainConfig
from defect_tune.core.config import load_config as _load_config


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A training config: defaults, then the YAML file at `path`, then `overrides`, validated."""
    return _load_config(Path(path) if path is not None else None, overrides)


def prepare(source: str | Path | None, out: str | Path, **options: Any) -> Path:
    """`defect-tune prepare`: `options` are `data.prepare.PrepareOptions` fields (format,
    image_size, fit, split, seed, classes, long_tail, ...). Returns `out`, the prepared folder."""
    from defect_tune.data.prepare import PrepareOptions
    from defect_tune.data.prepare import prepare as run_prepare

    command = shlex.join(["defect_tune.api.prepare", str(source), str(out)])
    run_prepare(PrepareOptions(source=Path(source) if source is not None else None, out=Path(out),
                               command=command, **options))
    return Path(out)


def search(data: str | Path, space: str | Path | None = None, name: str = "notebook", out: str | Path | None = None,
           **overrides: Any) -> dict:
    """`defect-tune search` on a local Ray cluster (or `address=...`): `space` is a file or a
    bundled space's name; keyword arguments that are `search.options.SearchOptions` fields set
    those (num_samples, cpus_per_worker, address, wandb_project, cv, ...), any other is a
    `key=value` override of the space (`epochs=10`). Returns the sweep's summary (sweep.json)."""
    import dataclasses

    from defect_tune.search.options import SearchOptions
    from defect_tune.search.space import resolve_space
    from defect_tune.search.sweep import run_search

    fields = {field.name for field in dataclasses.fields(SearchOptions)} - {"data", "space", "name", "out", "overrides"}
    options = {key: overrides.pop(key) for key in list(overrides) if key in fields}
    path = resolve_space(space)  # run_search checks the space and the overrides before Ray starts
    return run_search(SearchOptions(data=data, space=path, name=name, out=Path(out) if out is not None else None,
                                    overrides=overrides, **options))


def leaderboard(results: str | Path) -> pd.DataFrame:
    """A sweep's leaderboard, best first (what `leaderboard.csv` holds)."""
    from defect_tune.core.errors import UserError
    from defect_tune.core.leaderboard import read_leaderboard

    path = Path(results) / "leaderboard.parquet"
    if not path.is_file():
        raise UserError(f"{path}: no leaderboard (run a sweep with --out {results})")
    return read_leaderboard(path)


def report(results: str | Path, out: str | Path | None = None) -> Path:
    """`defect-tune report`: the sweep's HTML page and its PNGs (in RESULTS/report unless `out`);
    returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from defect_tune.report.page import write_report

    return write_report(Path(results), Path(out) if out is not None else None)


def export(results: str | Path, out: str | Path, rank: int = 1, metric: str | None = None, mode: str | None = None,
           max_latency_ms: float | None = None, max_params: str | float | None = None) -> dict:
    """`defect-tune export`: the `rank`-th best trial (within the cost limits) written to `out`,
    ready for `retrain`; returns what was written."""
    from defect_tune.production.export import export_trial

    return export_trial(Path(results), Path(out), rank, metric, mode, max_latency_ms, max_params)


def retrain(export: str | Path, data: str | Path, out: str | Path, mlflow: str | None = None,
            register: str | None = None, **options: Any) -> Path:
    """`defect-tune retrain` on a local Ray cluster (or `address=...`): `options` are
    `production.retrain.RetrainOptions` fields (holdout, workers, cpus_per_worker,
    gpus_per_worker, seed, overwrite, ...). With `mlflow` (a tracking URI) the model is logged
    there too, and registered as a version of `register`. Returns `out`, the model directory."""
    from defect_tune.production.registry import log_model_dir
    from defect_tune.production.retrain import RetrainOptions, check_mlflow
    from defect_tune.production.retrain import retrain as run_retrain

    check_mlflow(mlflow, register)
    run_retrain(RetrainOptions(export=Path(export), data=data, out=Path(out), **options))
    if mlflow is not None:
        log_model_dir(Path(out), mlflow, register, export_file=Path(export))
    return Path(out)


def predict(model: str | Path, images: list[str | Path], out: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """`defect-tune predict`: one row per image (path, prob/<class>, pred/<class>, defects,
    error); `images` are files, folders or globs. `options`: batch_size, tta, device, runtime.
    Written to the CSV `out` when given. Raises PredictError when the model gave non-finite
    probabilities, rather than hand back rows that read as "no defect"."""
    from defect_tune.production.predict import non_finite_error, predict_images, predict_to_csv

    inputs = [str(image) for image in images]
    if out is not None:
        return predict_to_csv(Path(model), inputs, Path(out), **options)
    table = predict_images(Path(model), inputs, **options)
    if (error := non_finite_error(table, None, Path(model))) is not None:
        raise error
    return table


def best_config(results: str | Path) -> TrainConfig:
    """The training config `defect-tune export` would pick from a sweep (its best trial)."""
    from defect_tune.production.export import build_export

    exported = build_export(Path(results), 1, None, None)
    return TrainConfig.model_validate(exported["config"])
