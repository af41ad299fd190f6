"""The Python API, for notebooks and scripts: the same steps as the command line.

    from defect_tune import api

    data = api.prepare("data/synthetic-voc", "data/synthetic", format="synthetic", image_size=32, synthetic_images=300)
    summary = api.search(data, space="quick", name="notebook", out="results/notebook", epochs=1, num_samples=2)
    board = api.leaderboard("results/notebook")            # a pandas DataFrame, best first
    print(board[["trial_id", summary["objective"], "epochs"]].head())
    config = api.best_config("results/notebook")           # the winner's TrainConfig
    config = api.load_config(None, lr=3e-4, epochs=10)     # or a config of your own

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


def best_config(results: str | Path) -> TrainConfig:
    """The training config `defect-tune export` would pick from a sweep (its best trial)."""
    from defect_tune.production.export import build_export

    exported = build_export(Path(results), 1, None, None)
    return TrainConfig.model_validate(exported["config"])
