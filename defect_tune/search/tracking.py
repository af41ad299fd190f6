"""`search --wandb PROJECT`: every trial of a sweep becomes a W&B run, grouped by sweep name.

Ray's own `WandbLoggerCallback` does the work (one logging actor and one W&B run per trial, on the
driver's node; a trial ASHA stops is finished like any other). This module adds what a sweep
needs on top: the group, job type and tags; the sweep's constants in each run's config; our
`epoch` as the x axis (Tune's `training_iteration` restarts at 1 when a trial resumes); and, when
a trial ends, a per-class table and a summary (best objective, best epoch, epochs, stop reason).

Without an API key or a stored `wandb login`, runs are written offline under the sweep's results
folder for `wandb sync` to upload later. The key never travels in Ray's runtime_env (Ray's
runtime-env agent writes a runtime_env verbatim to its log), nor into a config, result or file.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ray
from ray.air.integrations.wandb import WandbLoggerCallback

from defect_tune.core.config import better, selection_metric
from defect_tune.core.errors import UserError
from defect_tune.ray_compat import wandb_logging_parts
from defect_tune.search.leaderboard import stop_reason

_WandbLoggingActor, _QueueItem, _force_on_current_node = wandb_logging_parts()

FINAL = "_defect_tune_final"  # result key of the item queued when a trial ends


class TrackingError(UserError):
    """W&B tracking that cannot start; the message says why."""


def wandb_mode(environ: Mapping[str, str], stored_login: Callable[[], bool]) -> str:
    """An explicit WANDB_MODE wins; otherwise online with a key (WANDB_API_KEY or `wandb login`),
    offline without one, so that a sweep never stops to ask for a key."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY") or stored_login():
        return "online"
    return "offline"


def _stored_login() -> bool:
    import wandb

    # Reads WANDB_API_KEY, the settings files and ~/.netrc; no prompt, no network.
    return wandb.login(prompt=False, verify=False)


class _TrialRun(_WandbLoggingActor):
    """Ray's logging actor for one trial, plus our x axis and the end-of-trial table and summary."""

    def __init__(self, *args, api_key: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if api_key:  # this process only: the actor runs on the driver's node, for this trial alone
            os.environ["WANDB_API_KEY"] = api_key
        self._axes_defined = False

    def run(self):
        super().run()  # ends with wandb.finish()
        # finish() returns before the run's file is written: wandb-core holds the transaction log's
        # current 32 KiB block in memory until it closes the run's stream, on a message finish()
        # sends without waiting. Tune kills this actor, and wandb-core with it, once run() returns,
        # so an offline run could keep nothing but the file header. teardown() waits for wandb-core
        # to close every stream and exit.
        self._wandb.teardown()

    def _handle_result(self, result: dict) -> tuple[dict, dict]:
        if not self._axes_defined:  # wandb.init has run by now (in `run`, before the first item)
            self._wandb.define_metric("epoch")
            self._wandb.define_metric("*", step_metric="epoch", step_sync=True)
            self._axes_defined = True
        final = result.pop(FINAL, None)
        if final is not None:
            self._wandb.run.summary.update(final["summary"])
            return {"per_class": self._wandb.Table(columns=final["columns"], data=final["rows"])}, {}
        log, config_update = super()._handle_result(result)
        # Without a step, W&B numbers rows itself and `epoch` is the x axis (define_metric above):
        # Tune's training_iteration, which Ray would use, starts again at 1 in a resumed trial.
        log.pop("training_iteration", None)
        return log, config_update


class SweepRuns(WandbLoggerCallback):
    """One W&B run per trial, grouped by sweep name."""

    _logger_actor_cls = _TrialRun

    def __init__(self, project: str, sweep: str, space, meta: dict, wandb_dir: str, mode: str):
        super().__init__(
            project=project, group=sweep, job_type="trial", tags=["defect-tune", Path(space.path).stem],
            dir=wandb_dir, mode=mode, resume="allow",
        )
        self.mode = mode
        self.objective, self.objective_mode, self.max_epochs = space.objective, space.mode, space.max_epochs
        self.points = {tuple(sorted(p.items())): name for name, p in space.points}
        self.constants = {
            "sweep": sweep, "space": space.path, "data_fingerprint": meta.get("source_fingerprint"),
            "objective": space.objective, "max_epochs": space.max_epochs, "fixed": dict(space.fixed),
        }
        self.classes = list(meta["classes"])
        splits = meta.get("splits", {})
        self.positives = {s: splits[s].get("positives", {}) for s in ("train", "val") if s in splits}
        self.progress: dict[str, dict] = {}  # trial id -> best and last epoch seen

    def setup(self, *args, **kwargs):
        if self.mode in ("online", "run"):  # Ray's setup insists on a key, which offline needs none of
            super().setup(*args, **kwargs)

    def _start_logging_actor(self, trial, exclude_results, **init_kwargs):
        if not self._remote_logger_class:
            # Ray's own copies WANDB_API_KEY into the actor's runtime_env; Ray's runtime-env agent
            # logs every runtime_env it creates ("Creating runtime env: {...}") in plain text.
            self._remote_logger_class = ray.remote(
                num_cpus=0, **_force_on_current_node(), max_restarts=-1, max_task_retries=-1
            )(self._logger_actor_cls)
        sampled = {k: v for k, v in trial.config.items() if not k.startswith("_")}
        init_kwargs.update(
            name=trial.trial_id,
            config={**init_kwargs["config"], **self.constants,
                    "starting_point": self.points.get(tuple(sorted(sampled.items())))},
        )
        key = os.environ.get("WANDB_API_KEY") if self.mode in ("online", "run") else None
        super()._start_logging_actor(trial, exclude_results, **init_kwargs, **({"api_key": key} if key else {}))

    def log_trial_result(self, iteration, trial, result):
        self.note(trial.trial_id, result)
        super().log_trial_result(iteration, trial, result)

    def note(self, trial_id: str, result: dict) -> None:
        """Keep a trial's epoch count and its best epoch's figures for the end-of-trial summary."""
        seen = self.progress.setdefault(trial_id, {"epochs": 0, "best": None, "early_stopped": False})
        # Ranked as the leaderboard does: by the selection score (the objective, ties broken by
        # AP) where the trial reports one.
        epoch, value = result.get("epoch"), result.get(selection_metric(self.objective), result.get(self.objective))
        if epoch is not None:
            seen["epochs"] = max(seen["epochs"], int(epoch))
            seen["early_stopped"] = bool(result.get("early_stopped"))
            seen["planned"] = result.get("planned_epochs", self.max_epochs)  # a searched `epochs` sets it per trial
        if result.get("diverged"):  # the trial ends itself with this report: it failed of it
            seen["diverged"] = result["diverged"]
            return
        if value is None:
            return
        best = seen.get("best_value")
        if better(value, best, self.objective_mode):
            keys = [self.objective, "epoch",
                    *(f"{kind}/{c}" for kind in ("val_recall", "threshold") for c in self.classes)]
            seen["best"], seen["best_value"] = {k: result.get(k) for k in keys}, value

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._trial_queues:  # queued ahead of Ray's END, so the run has it before finishing
            self._trial_queues[trial].put((_QueueItem.RESULT, {FINAL: self.final(trial.trial_id, failed)}))
        super().log_trial_end(trial, failed)

    def final(self, trial_id: str, failed: bool) -> dict:
        """The trial's summary and per-class table (its best epoch's recall and threshold)."""
        seen = self.progress.get(trial_id, {"epochs": 0, "best": None, "early_stopped": False})
        best = seen["best"] or {}
        summary = {
            "stop_reason": stop_reason(seen["epochs"], seen.get("planned", self.max_epochs), seen["early_stopped"],
                                       failed or "diverged" in seen),
            "epochs": seen["epochs"], "best_epoch": best.get("epoch"),
        }
        if "diverged" in seen:
            summary["error"] = seen["diverged"]
        if best:  # ranks runs as the leaderboard does: by the best epoch, not the last
            summary[self.objective] = best[self.objective]
        columns = ["class", "train_positives", "val_positives", "val_recall", "threshold"]
        rows = [
            [c, self.positives.get("train", {}).get(c), self.positives.get("val", {}).get(c),
             best.get(f"val_recall/{c}"), best.get(f"threshold/{c}")]
            for c in self.classes
        ]
        return {"summary": summary, "columns": columns, "rows": rows}


def wandb_callbacks(project: str | None, sweep: str, out: Path, space, meta: dict, console) -> list:
    """`[SweepRuns]` for `--wandb PROJECT`, `[]` without it. Decides online or offline and says so."""
    if not project:
        return []
    try:
        importlib.import_module("wandb")  # a missing or broken install fails here, not in every trial
    except ImportError as error:
        raise TrackingError(f"--wandb needs the wandb package (pip install 'wandb==0.31.0'): {error}") from None
    mode = wandb_mode(os.environ, _stored_login)
    if mode in ("online", "run") and not (os.environ.get("WANDB_API_KEY") or _stored_login()):
        raise TrackingError(f"WANDB_MODE={mode} but no W&B API key: set WANDB_API_KEY, run `wandb login`, "
                            "or unset WANDB_MODE to log offline")
    # W&B writes into <dir>/wandb; without a dir, into the logging actor's working directory.
    wandb_dir = Path(os.environ.get("WANDB_DIR") or out).absolute()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    if mode in ("offline", "dryrun"):
        console.print(
            f"W&B offline (no WANDB_API_KEY or `wandb login`): runs go to {wandb_dir / 'wandb'}; "
            f"upload them with `wandb sync {wandb_dir / 'wandb'}/offline-run-*`",
            highlight=False, markup=False, soft_wrap=True,
        )
    elif mode != "disabled":
        console.print(f"W&B: each trial a run in project {project}, group {sweep}", highlight=False, markup=False)
    return [SweepRuns(project, sweep, space, meta, str(wandb_dir), mode)]
