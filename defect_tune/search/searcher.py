"""Tune's searcher and scheduler for a sweep: Optuna's TPE, told what ASHA stopped and who proposed
each trial, and ASHA that lets the starting points train to the end; the study stored in the
results folder."""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from defect_tune.ray_compat import optuna_trial_of


def startup_trials(points: int, concurrent: int) -> int:
    """Trials told to Optuna before TPE proposes: Optuna's default spends its first 10 at random,
    more than a sweep on a time budget ever runs. The starting points are the informed start; the
    first trial after them is asked for while up to C - 1 of them still run, hence
    `points - concurrent + 1`. With no points, a few random ones."""
    return max(1, points - concurrent + 1) if points else 4


def tpe_sampler(startup: int, seed: int):
    """Optuna's TPE, proposing once `startup` trials are told. Multivariate (with `group` for the space's
    conditional parameters) models how lr, loss and backbone act together; the constant liar
    keeps parallel trials from being proposed on top of each other."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # multivariate, group and constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(n_startup_trials=startup, multivariate=True, group=True, constant_liar=True,
                                          seed=seed)


PROPOSED_BY = "proposed_by"  # an Optuna user attribute: a starting point's name, "tpe" or "random (startup)"


class AshaAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, with three things a sweep on a budget needs.

    - A trial ASHA stopped is told to Optuna as pruned, not completed: Tune reports it complete
      with its last, partly trained value, which biases TPE toward configurations that look good
      early. As PRUNED, TPE ranks it by its intermediate values instead (the base class marks a
      trial PRUNED when no value is given).
    - Each trial's Optuna record says who proposed it (`PROPOSED_BY`): a starting point, TPE, or
      the sampler's random start-up.
    - With a time budget, no trial starts that cannot reach ASHA's first rung before it runs out:
      it would hold a worker until the deadline and be cut off with nothing to rank.
    """

    def __init__(self, *args, max_epochs: int, point_names: list[str] = (), startup: int = 0, grace_period: int = 1,
                 budget_s: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._startup = startup
        self._max_epochs = max_epochs
        self._point_names = list(point_names)
        self._grace_period = grace_period
        self._budget_s = budget_s
        self._deadline = None  # set at the first suggestion in this process (again after --resume)
        self._to_first_rung: dict[str, float] = {}  # trial id: seconds from its start to ASHA's first rung

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._deadline = None

    def rung_estimate(self) -> float | None:
        """The median time a trial took from its start to ASHA's first rung, once one got there."""
        times = sorted(self._to_first_rung.values())
        return times[len(times) // 2] if times else None

    def suggest(self, trial_id: str):
        if self._budget_s is not None:
            now = time.time()
            self._deadline = self._deadline or now + self._budget_s
            estimate = self.rung_estimate()
            if estimate is not None and now + estimate > self._deadline:
                return self.FINISHED
        params = super().suggest(trial_id)
        trial = optuna_trial_of(self, trial_id)
        if trial is not None and PROPOSED_BY not in trial.user_attrs:
            trial.set_user_attr(PROPOSED_BY, self._proposer(trial))
        return params

    def _proposer(self, trial) -> str:
        if trial.number < len(self._point_names):  # Ray enqueues the points first, in order
            return self._point_names[trial.number]
        import optuna

        told = len(trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.PRUNED)))
        return "tpe" if told >= self._startup else "random (startup)"

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("epoch") == self._grace_period and "time_total_s" in result:
            self._to_first_rung.setdefault(trial_id, float(result["time_total_s"]))
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_by_scheduler = (
            not error and result is not None and not result.get("early_stopped")
            # A trial whose own (searched) epoch budget ended before max_epochs completed.
            and result.get("epoch", self._max_epochs) < result.get("planned_epochs", self._max_epochs)
        )
        # Tune hands a trial's last result here only: report it as its last epoch's value, so the
        # stored study holds every epoch (Optuna takes no per-epoch values under several objectives).
        trial = optuna_trial_of(self, trial_id) if result and not isinstance(self.metric, list) else None
        if trial is not None and result.get(self.metric) is not None and "training_iteration" in result:
            trial.report(float(result[self.metric]), int(result["training_iteration"]))
        super().on_trial_complete(trial_id, None if stopped_by_scheduler else result, error)


class PointsFinishASHA(ASHAScheduler):
    """ASHA for the proposals; the space's starting points (its recipes) train to the end.

    A starting point is the recipe a user would otherwise train alone, and the sweep's answer
    has to beat it. Judged at a rung on a small validation set, early in its schedule (a
    one-cycle warm-up has just peaked), a strong recipe is often stopped by noise, and the sweep
    then hands back something weaker than the recipe it started from. Its values still enter
    every rung, so proposals are judged against it. A point is recognised by its parameters,
    so the rule holds after --resume (the scheduler is restored from its pickle alone)."""

    def __init__(self, *args, points: list[dict] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._points = [dict(point) for point in points]

    def is_point(self, config: dict) -> bool:
        return any(all(config.get(key) == value for key, value in point.items()) for point in self._points)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if (action == self.STOP and result.get(self._time_attr, self._max_t) < self._max_t
                and self.is_point(trial.config)):
            self._num_stopped -= 1
            return self.CONTINUE
        return action


SPACE_FILE = "space.yaml"  # in the results folder: a copy of the sweep's search space


STUDY_FILE = "optuna.db"  # in the results folder: the sweep's Optuna study, for optuna-dashboard


def study_storage(out: Path):
    """The sweep's Optuna study in SQLite in the results folder: every trial's parameters, its
    per-epoch values and its state (ASHA-stopped trials as PRUNED), written by the driver as the
    searcher learns them, so that `optuna-dashboard sqlite:///RESULTS/optuna.db` works during and
    after the sweep. Tune pickles the searcher for --resume; the storage reconnects on unpickling."""
    import optuna

    out.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{(out / STUDY_FILE).absolute()}")
