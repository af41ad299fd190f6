"""What the driver prints while a sweep runs: a line per event and where the sweep stands."""

from __future__ import annotations

import time

from ray import tune
from rich.console import Console

from defect_tune.core.config import better, direction, selection_metric
from defect_tune.core.leaderboard import STOP_REASONS
from defect_tune.core.units import clock
from defect_tune.search.space import SearchSpace


class SweepConsole(tune.Callback):
    """What the driver shows while the sweep runs: one line per event (a trial starts, reports an
    epoch, finishes or is stopped, fails), each finish with where the sweep stands (trials
    finished, running, best so far with its interval, elapsed and remaining time). On a terminal a
    live status line stays below them; in a log the lines alone, never a table reprinted per trial."""

    def __init__(self, space: SearchSpace, console: Console, budget_s: float | None = None):
        self.space, self.console, self.budget_s = space, console, budget_s
        self.rows: dict[str, dict] = {}
        self.started: float | None = None
        self.live = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "console": None, "live": None, "started": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, console=Console(stderr=True))

    def setup(self, **info):
        self.started = time.monotonic()
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.status(), console=self.console, refresh_per_second=2, transient=True)
            self.live.start()

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        if self.live is not None:
            self.live.update(self.status())

    def _row(self, trial) -> dict:
        return self.rows.setdefault(trial.trial_id, {"state": "running", "epoch": 0, "objective": None, "low": None,
                                                     "high": None, "planned": self.space.max_epochs, "early": False})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "running"
        of = f"/{self.space.num_samples}" if self.space.num_samples > 0 else ""
        self._say(f"[start {len(self.rows)}{of}] {trial.trial_id} {_short(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        key = self.space.objective
        value = result.get(key)
        score = result.get(selection_metric(key), value)
        row.update(epoch=result.get("epoch", 0), planned=result.get("planned_epochs", self.space.max_epochs),
                   early=bool(result.get("early_stopped")), diverged=result.get("diverged"))
        # A trial counts with its best epoch so far, as the leaderboard ranks it.
        if score is not None and better(score, row.get("score"), self.space.mode):
            row.update(objective=value, score=score, low=result.get(f"{key}_low"), high=result.get(f"{key}_high"))
        shown = "-" if value is None else f"{value:.4f}"
        self._say(f"[epoch {row['epoch']}/{row['planned']}] {trial.trial_id} {key}={shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row.get("diverged"):  # the trial ended itself with this report: it failed, as the leaderboard says
            row["state"], how = "error", f"failed after epoch {row['epoch']} ({row['diverged']})"
        elif row["epoch"] >= row["planned"]:
            row["state"], how = "completed", f"completed {row['epoch']} epochs"
        elif row["early"]:
            row["state"], how = "early_stopping", f"stopped itself (early stopping) after epoch {row['epoch']}"
        else:
            row["state"], how = "asha", f"stopped by ASHA after epoch {row['epoch']}"
        self._say(f"[done] {trial.trial_id} {how}: {_figure(row)}. {self.standing()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "error"
        self._say(f"[error] {trial.trial_id}: see {trial.local_path}/error.txt. {self.standing()}")

    def best(self) -> tuple[str, dict] | None:
        scored = [(t, r) for t, r in self.rows.items() if r["objective"] is not None and r["state"] != "error"]
        if not scored:
            return None
        sign = direction(self.space.mode)  # ties on the objective go to validation AP, as in the leaderboard
        return max(scored,
                   key=lambda item: sign * (item[1]["objective"] if item[1].get("score") is None else item[1]["score"]))

    def standing(self) -> str:
        states = [row["state"] for row in self.rows.values()]
        finished = sum(s != "running" for s in states)
        of = f"/{self.space.num_samples}" if self.space.num_samples > 0 else ""
        counts = ", ".join(f"{n} {label}" for reason, label in STOP_REASONS.items() if (n := states.count(reason)))
        parts = [f"{finished}{of} finished" + (f" ({counts})" if counts else ""), f"{states.count('running')} running"]
        if (best := self.best()) is not None:
            parts.append(f"best {best[0]} {_figure(best[1])}")
        if self.started is not None:
            elapsed = time.monotonic() - self.started
            parts.append(f"{clock(elapsed)} elapsed")
            if self.budget_s:
                parts.append(f"at most {clock(max(self.budget_s - elapsed, 0))} left (time budget)")
            elif self.space.num_samples > 0 and finished:
                left = self.space.num_samples - finished
                parts.append(f"about {clock(elapsed / finished * left)} left" if left else "all trials finished")
        return "; ".join(parts)

    def status(self):
        from rich.text import Text

        return Text(f"sweep: {self.standing()}", style="bold")


def _figure(row: dict) -> str:
    if row["objective"] is None:
        return "no objective"
    interval = f" ({row['low']:.3f}-{row['high']:.3f})" if row["low"] is not None and row["high"] is not None else ""
    return f"{row['objective']:.4f}{interval}"


def _short(config: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())
