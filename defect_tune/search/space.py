"""Search spaces as data: a YAML file becomes an Optuna define-by-run function.

    objective: val_guarded_macro_recall     # reported by every trial each epoch
    mode: max
    num_samples: 12                          # trial budget
    max_epochs: 6                            # every trial's epoch budget (ASHA's max_t)
    asha: {grace_period: 1, reduction_factor: 2}
    cv: 0                                    # K folds per trial over train+val, or auto (`search --cv`)
    fixed: {batch_size: 64, augment: light}  # any TrainConfig key
    params:                                  # sampled in this order
      model: {choice: [el_cnn, resnet18]}
      lr: {loguniform: [1.0e-4, 3.0e-3]}
      loss: {choice: [bce, weighted_bce, focal]}
      focal_gamma: {uniform: [0.5, 4.0], when: {loss: focal}}   # conditional: sampled only then
    points_to_evaluate:                      # measured in every sweep (the seeds' own defaults)
      - {name: baseline}                     # the plain recipe: every searched key at its default
      - {name: el_seed, params: {model: el_cnn, loss: weighted_bce, lr: 1.0e-3}}

Distributions: `choice` (list), `uniform` / `loguniform` ([low, high]), `int` / `int_log`
([low, high], inclusive). `when` maps earlier parameters to a value or list of values.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from defect_tune.core.config import ConfigError, TrainConfig, load_config, load_yaml, recipe, validate_config
from defect_tune.core.errors import UserError
from defect_tune.core.leaderboard import COSTS as LEADERBOARD_COSTS

BASELINE = "baseline"  # a point given by name only: the plain recipe (SearchSpace.recipe_params)
# Points given by name only, and the recipe each one is.
RECIPE_POINTS = {BASELINE: "scratch", "transfer": "transfer"}
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "int_log")
TOP_LEVEL = {"objective", "mode", "num_samples", "max_epochs", "asha", "cv", "fixed", "params", "points_to_evaluate",
             "description", "trade_offs"}
# What a sweep can trade its objective against: every cost a trial reports.
COSTS = tuple(LEADERBOARD_COSTS)


class SpaceError(UserError):
    """A search space that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    values: tuple  # the choices, or (low, high)
    when: dict[str, tuple] = field(default_factory=dict)

    def active(self, sampled: dict) -> bool:
        return all(sampled.get(key) in allowed for key, allowed in self.when.items())

    def contains(self, value) -> bool:
        """Whether a trial of this parameter can take `value`."""
        if self.kind == "choice":
            return value in self.values
        return isinstance(value, int | float) and self.values[0] <= value <= self.values[1]


@dataclass(frozen=True)
class SearchSpace:
    """A search space file, checked (`load_space`): what a sweep ranks by (`objective`, `mode`),
    how many trials and epochs it may run, ASHA's rungs, the keys it fixes, the parameters it
    searches (`params`, each possibly conditional on another), and the starting points it
    measures first (`points`: each a name and its parameters, a recipe written by name)."""

    path: str
    objective: str
    mode: str
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    points: tuple[tuple[str, dict], ...]  # (name, params) for points_to_evaluate
    cv: int | str = 0  # folds per trial (0: prepare's split), or "auto" (search.resolve_cv)
    # More objectives Optuna trades the first against (multi-objective TPE), as (metric, mode):
    # costs, all minimised. ASHA, the leaderboard and export still rank by `objective`.
    trade_offs: tuple[tuple[str, str], ...] = ()

    @property
    def metrics(self) -> tuple[list[str], list[str]]:
        """What the searcher is told per trial: the objective (its selection score), then each trade-off."""
        from defect_tune.core.config import selection_metric

        return ([selection_metric(self.objective), *(m for m, _ in self.trade_offs)],
                [self.mode, *(mode for _, mode in self.trade_offs)])

    def sample(self, trial) -> dict:
        """The define-by-run body: suggest each active parameter on an Optuna trial."""
        sampled: dict[str, Any] = {}
        for p in self.params:
            if not p.active(sampled):
                continue
            if p.kind == "choice":
                sampled[p.name] = trial.suggest_categorical(p.name, list(p.values))
            elif p.kind in ("uniform", "loguniform"):
                sampled[p.name] = trial.suggest_float(p.name, *p.values, log=p.kind == "loguniform")
            else:
                sampled[p.name] = trial.suggest_int(p.name, *p.values, log=p.kind == "int_log")
        return sampled

    def config_for(self, sampled: dict) -> TrainConfig:
        """The full training config of a trial: fixed values, the sampled ones, and the epoch budget
        unless `epochs` is searched."""
        return load_config(None, {**self.fixed, "epochs": self.max_epochs, **sampled})

    def with_overrides(self, overrides: dict) -> SearchSpace:
        """This space with `key=value` overrides from the command line (`search epochs=10
        batch_size=32`): `epochs` sets the epoch budget (max_epochs), any other TrainConfig key a
        fixed value. A key the space searches cannot be fixed this way: that is a different space."""
        if not overrides:
            return self
        where = f"{self.path} + overrides"
        fixed, max_epochs = dict(self.fixed), self.max_epochs
        for key, value in overrides.items():
            if key == "epochs":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise SpaceError(f"override epochs={value!r}: the epoch budget must be a positive integer")
                max_epochs = value
            elif any(p.name == key for p in self.params):
                raise SpaceError(f"override {key}={value!r}: {self.path} searches {key}; edit the space's params "
                                 "to fix it, or drop the override")
            else:
                fixed[key] = value
        try:
            validate_config({**fixed, "epochs": max_epochs}, where)
        except ConfigError as error:
            raise SpaceError(str(error)) from None
        if self.grace_period > max_epochs:
            raise SpaceError(f"override epochs={max_epochs}: below the space's asha.grace_period {self.grace_period}")
        searched_epochs = [p for p in self.params if p.name == "epochs"]
        if searched_epochs and max(searched_epochs[0].values) > max_epochs:
            raise SpaceError(f"override epochs={max_epochs}: the space searches epochs up to "
                             f"{max(searched_epochs[0].values)}")
        return dataclasses.replace(self, fixed=fixed, max_epochs=max_epochs)

    def recipe_params(self, name: str, where: str) -> dict:
        """A starting recipe (core.config.RECIPES) as a point of this space: every parameter its
        branch samples at the recipe's value, else TrainConfig's default; `fixed` and the epoch
        budget apply as to every trial. A recipe value the space cannot reach is an error, not a
        nearby value."""
        changes = recipe(RECIPE_POINTS[name])
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            value = changes.get(p.name, TrainConfig.model_fields[p.name].default)
            if not p.contains(value):
                raise _fail(self.path, f"{where} ({name})",
                            f"the recipe's {p.name} {value!r} is outside the searched {p.kind} {list(p.values)}")
            values[p.name] = value
        for key, value in changes.items():
            reached = (key in values or key == "epochs"
                       or self.fixed.get(key, TrainConfig.model_fields[key].default) == value)
            if not reached:
                raise _fail(self.path, f"{where} ({name})", f"the recipe sets {key}={value!r}, which this space's "
                            f"trials cannot take on that branch: search or fix {key}")
        return values

    def for_data(self, meta: dict, upsample: bool = False) -> tuple[SearchSpace, str | None]:
        """This space on data stored at `meta`'s size. Unless `upsample`, no `input_size` choice
        above the stored longer side: the network would enlarge every image, a slower trial that
        sees nothing new. Points that named such a size take the largest one kept. Returns the
        space and a note naming what was left out (None when nothing was)."""
        stored = max(meta["image"]["height"], meta["image"]["width"])
        searched = next((p for p in self.params if p.name == "input_size" and p.kind == "choice"), None)
        if upsample or searched is None or all(v is None or v <= stored for v in searched.values):
            return self, None
        kept = tuple(v for v in searched.values if v is None or v <= stored) or (None,)
        largest = None if None in kept else max(kept)
        params = tuple(dataclasses.replace(p, values=kept) if p is searched else p for p in self.params)
        points = tuple((name, {**values, "input_size": largest} if (values.get("input_size") or 0) > stored else values)
                       for name, values in self.points)
        dropped = [v for v in searched.values if v not in kept]
        note = (f"input_size {dropped} left out of the search: the data is stored at {stored} px, and a larger input "
                "only enlarges the images (search --upsample keeps them)")
        return dataclasses.replace(self, params=params, points=points), note

    def check_weights(self) -> list[str]:
        """Before the sweep: every backbone this space can train with ImageNet weights has them on
        this machine (each worker looks again, in the same order). One line per such backbone,
        naming its source; a SpaceError naming every one that has none, and where it looked."""
        from defect_tune.training.models import ModelError, resolve_weights

        searched = next((p for p in self.params if p.name == "pretrained"), None)
        lines, missing = [], []
        for model in dict.fromkeys(self.values_of("model")):
            if searched is not None:
                pretrained = True in searched.values and model in searched.when.get("model", (model,))
            else:
                pretrained = bool(self.fixed.get("pretrained")) or bool(self.fixed.get("pretrained_path"))
            if not pretrained:
                continue
            try:
                weights = resolve_weights(self.config_for({"model": model, "pretrained": True}))
                lines.append(weights.describe())
            except ModelError as error:
                missing.append(str(error))
        if missing:
            raise SpaceError(f"{self.path}: {len(missing)} backbone(s) it trains from ImageNet weights cannot be built "
                             f"on this machine: " + " | ".join(missing))
        return lines

    def values_of(self, key: str) -> list:
        """What `key` can be in this space's trials: a choice's values, a range's bounds, or its
        one fixed (or default) value."""
        for p in self.params:
            if p.name == key:
                return list(p.values)
        return [self.fixed.get(key, TrainConfig.model_fields[key].default)]

    def largest_configs(self) -> list[TrainConfig]:
        """One config per backbone this space can train, each with the settings that take the
        most GPU memory (the largest batch, CBAM and the MLP head where searched), whatever
        `when` conditions would allow: what `search --trials-per-gpu auto` measures."""
        worst = {key: max(self.values_of(key), key=rank) for key, rank in _MEMORY_RANK.items()}
        return [self.config_for({**worst, "model": model}) for model in dict.fromkeys(self.values_of("model"))]


# The keys that set a training worker's GPU memory besides the backbone, and which value needs most.
_MEMORY_RANK = {"batch_size": float, "head_hidden": float, "cbam": bool, "head": lambda head: head == "mlp"}


class DefineByRun:
    """Picklable define-by-run function for `OptunaSearch` (Tune pickles the searcher for
    `--resume`, so this must not be a closure). Returns nothing: Tune's config is exactly what was
    suggested, and fixed values travel separately."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        self.space.sample(trial)


def _known_model(name: str) -> bool:
    # timm and the models are imported here, not at the top: every Ray process that unpickles a
    # space would otherwise pay for them (several seconds of CPU each).
    import timm

    from defect_tune.training.models import SEED_MODELS

    return name in SEED_MODELS or timm.is_model(name)


def _fail(path, key: str, message: str) -> SpaceError:
    return SpaceError(f"{path}: {key}: {message}")


def _parse_param(path, name: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"params.{name}"
    if name not in TrainConfig.model_fields:
        close = difflib.get_close_matches(name, TrainConfig.model_fields, n=1)
        raise _fail(path, where, "not a config key" + (f"; did you mean {close[0]!r}?" if close else ""))
    if not isinstance(spec, dict):
        raise _fail(path, where, f"expected a mapping like {{choice: [...]}}, got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k != "when"]
    if len(kinds) != 1 or extra:
        raise _fail(path, where, f"needs exactly one of {DISTRIBUTIONS} (and optionally 'when'), got {sorted(spec)}")
    kind, values = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise _fail(path, where, "choice needs a non-empty list")
        for value in values:
            try:
                load_config(None, {name: value})
            except ConfigError as error:
                raise _fail(path, where, f"choice {value!r} is invalid: {error}") from None
            if name == "model" and not _known_model(value):
                from defect_tune.training.models import SEED_MODELS

                raise _fail(path, where, f"model {value!r} is neither a timm model nor one of {sorted(SEED_MODELS)}")
    else:
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, int | float) for v in values)):
            raise _fail(path, where, f"{kind} needs [low, high], got {values!r}")
        low, high = values
        if not low < high:
            raise _fail(path, where, f"{kind} needs low < high, got {values!r}")
        if kind in ("loguniform", "int_log") and low <= 0:
            raise _fail(path, where, f"{kind} needs low > 0, got {low}")
        if kind.startswith("int") and not all(isinstance(v, int) for v in values):
            raise _fail(path, where, f"{kind} needs integer bounds, got {values!r}")
        for bound in values:
            try:
                load_config(None, {name: bound})
            except ConfigError as error:
                raise _fail(path, where, f"bound {bound!r} is outside the config's range: {error}") from None
    when: dict[str, tuple] = {}
    for key, allowed in (spec.get("when") or {}).items():
        if key not in earlier:
            raise _fail(path, f"{where}.when.{key}", "must name a parameter listed before this one")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if earlier[key].kind == "choice" and not set(allowed) <= set(earlier[key].values):
            raise _fail(path, f"{where}.when.{key}", f"{list(allowed)} not among its choices "
                                                     f"{list(earlier[key].values)}")
        when[key] = allowed
    return Param(name, kind, tuple(values), when)


def load_space(path: Path) -> SearchSpace:
    """Read and check a search space file: every key, range and condition, and every starting
    point against the parameters its branch samples. Raises SpaceError naming the file and key."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SpaceError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key; expected some of {sorted(TOP_LEVEL)}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise _fail(path, "mode", f"must be max or min, got {mode!r}")
    for key in ("num_samples", "max_epochs"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise _fail(path, key, f"must be a positive integer, got {raw.get(key)!r}")
    asha = raw.get("asha") or {}
    if set(asha) - {"grace_period", "reduction_factor"}:
        raise _fail(path, "asha", f"unknown keys {sorted(set(asha) - {'grace_period', 'reduction_factor'})}")
    grace, factor = asha.get("grace_period", 1), asha.get("reduction_factor", 2)
    if not (isinstance(grace, int) and 1 <= grace <= raw["max_epochs"]):
        raise _fail(path, "asha.grace_period", f"must be an integer in [1, max_epochs], got {grace!r}")
    if not (isinstance(factor, int | float) and factor > 1):
        raise _fail(path, "asha.reduction_factor", f"must be > 1, got {factor!r}")
    cv = raw.get("cv", 0)
    if not (cv == "auto" or (isinstance(cv, int) and not isinstance(cv, bool) and (cv == 0 or cv >= 2))):
        raise _fail(path, "cv", f"must be 0 (no cross-validation), an integer >= 2 (folds) or auto, got {cv!r}")
    fixed = raw.get("fixed") or {}
    try:
        load_config(None, fixed)
    except ConfigError as error:
        raise _fail(path, "fixed", str(error)) from None
    params: dict[str, Param] = {}
    for name, spec in (raw.get("params") or {}).items():
        if name in fixed:
            raise _fail(path, f"params.{name}", "is also in fixed; a key is either fixed or searched")
        params[name] = _parse_param(path, name, spec, params)
    if not params:
        raise _fail(path, "params", "needs at least one parameter to search")
    if "epochs" in fixed:
        raise _fail(path, "fixed.epochs", "the epoch budget is max_epochs (or search epochs up to it)")
    if "epochs" in params and max(params["epochs"].values) > raw["max_epochs"]:
        raise _fail(path, "params.epochs", f"{list(params['epochs'].values)} exceeds max_epochs {raw['max_epochs']} "
                                           "(ASHA's max_t)")
    trade_offs = raw.get("trade_offs") or []
    if not isinstance(trade_offs, list) or not all(isinstance(t, str) for t in trade_offs):
        raise _fail(path, "trade_offs", f"expected a list of cost metrics to minimise, some of {list(COSTS)}")
    unknown = [t for t in trade_offs if t not in COSTS]
    if unknown or len(set(trade_offs)) != len(trade_offs):
        raise _fail(path, "trade_offs", f"{unknown or trade_offs} : each once, from {list(COSTS)}")
    space = SearchSpace(
        path=str(path), objective=raw.get("objective", "val_guarded_macro_recall"), mode=mode,
        num_samples=raw["num_samples"], max_epochs=raw["max_epochs"], grace_period=grace,
        reduction_factor=float(factor), fixed=fixed, params=tuple(params.values()), points=(), cv=cv,
        trade_offs=tuple((t, "min") for t in trade_offs),
    )
    return SearchSpace(**{**space.__dict__,
                          "points": _starting_points(path, space, raw.get("points_to_evaluate") or [])})


def _starting_points(path: Path, space: SearchSpace, listed: list) -> tuple[tuple[str, dict], ...]:
    """`points_to_evaluate`, each checked: exactly the parameters its own branch samples, each
    within its range, and a config that validates; a recipe named alone gets its values."""
    points = []
    for index, point in enumerate(listed):
        where = f"points_to_evaluate[{index}]"
        if isinstance(point, dict) and set(point) == {"name"} and point["name"] in RECIPE_POINTS:
            point = {"name": point["name"], "params": space.recipe_params(point["name"], where)}
        if not isinstance(point, dict) or set(point) - {"name", "params"} or "params" not in point:
            raise _fail(path, where, f"expected {{name: ..., params: {{...}}}}, or {{name: RECIPE}} for a recipe of "
                                     f"{sorted(RECIPE_POINTS)}")
        values = point["params"]
        active = {}
        for p in space.params:  # a point must set exactly the parameters its own branch samples
            if p.active(active):
                if p.name not in values:
                    raise _fail(path, f"{where}.params.{p.name}", "missing: this branch samples it")
                value = values[p.name]
                if not p.contains(value):
                    raise _fail(path, f"{where}.params.{p.name}", f"{value!r} is outside the searched {p.kind} "
                                                                  f"{list(p.values)}")
                active[p.name] = value
        stray = sorted(set(values) - set(active))
        if stray:
            raise _fail(path, f"{where}.params.{stray[0]}", "not sampled on this branch (or not a searched parameter)")
        try:
            space.config_for(values)
        except ConfigError as error:
            raise _fail(path, where, str(error)) from None
        points.append((str(point.get("name", f"point_{index}")), values))
    return tuple(points)


# The checkout's search_spaces/, installed as this package's data (pyproject.toml), so a wheel has it too.
SPACES_DIR = Path(str(importlib.resources.files("defect_tune.search_spaces")))


def bundled_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def space_name(path: Path | str) -> str:
    """How a sweep records its space: a bundled one by name (`quick`), any other as given."""
    return Path(path).stem if Path(path).parent == SPACES_DIR else str(path)


def resolve_space(space: Path | str | None) -> Path:
    """A space file: the bundled quick space when none is given; a bundled space by name (`el_solar`);
    otherwise the path as given, which must exist."""
    if space is None:
        return SPACES_DIR / "quick.yaml"
    path = Path(space)
    if path.is_file():
        return path
    bundled = SPACES_DIR / f"{path.name}.yaml"
    if path.parent == Path(".") and not path.suffix and bundled.is_file():
        return bundled
    raise SpaceError(f"{path}: no such search space file (bundled spaces, usable by name: "
                     f"{', '.join(bundled_spaces())})")
