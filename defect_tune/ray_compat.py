"""Every private Ray or Optuna name defect-tune relies on, in one place.

Each hook below uses something its library does not promise to keep. When the Ray pin
(pyproject.toml: ray 2.60.0) or the Optuna pin (5.0.0) moves, check each entry: run its guarding
test, and read the named upstream source if the test fails. Imports are inside the functions, so
that importing this module costs nothing and a hook that moved breaks only its own feature.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

# Ray's internal settings that defect-tune sets, read from the environment by the processes Ray
# starts. Their names are not promised to stay: when the pin moves, check each in Ray's source.
# (Why each is set: raytrain/cluster.py LOCAL_CLUSTER_ENV, raytrain/loop.py, search/sweep.py.)
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Train V2: a watcher actor per run
IDLE_WORKER_KILL_MS = "RAY_idle_worker_killing_time_threshold_ms"  # raylet: idle worker processes' lifetime
TRAIN_HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Train V2: how often the controller polls workers
TUNE_CHECKPOINT_PERIOD_S = "TUNE_GLOBAL_CHECKPOINT_S"  # Tune: how often the experiment state is saved


def local_cluster_addresses() -> list[str]:
    """GCS addresses of the Ray clusters running on this machine.

    Why: a second local cluster beside a running one hangs a sweep (`raytrain.cluster.refuse_second_local_cluster`).
    Private: `ray._private.services.find_gcs_addresses`, checked against Ray 2.60.
    Guarded by: tests/test_search_units.py::test_a_second_local_cluster_is_refused_with_the_running_address.
    """
    from ray._private.services import find_gcs_addresses

    return sorted(find_gcs_addresses())


def start_data_stats_actor() -> None:
    """Creates Ray Data's named, detached stats actor from the driver.

    Why: created from inside a trial it dies with that trial, so every trial starts another Ray
    process for it; created by the driver, one serves the whole sweep.
    Private: `ray.data._internal.stats.get_or_create_stats_actor`, checked against Ray 2.60.
    Guarded by:
    tests/test_search.py::test_asha_sweeps_in_a_row_complete_give_every_resource_back_and_log_every_trial_to_wandb
    (one `_StatsActor` process for the whole sweep).
    """
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_stats_actor()


def staged_experiment_states(experiment: str, state_file: str) -> Iterator[Path]:
    """Tune's own copies of an experiment's state file, in the driver's staging folders.

    Why: a driver killed while Tune copies the state to storage leaves a cut-short file there;
    `--resume` takes the staged copy instead.
    Private: Ray's temp-dir layout, `<RAY_TMPDIR or /tmp>/ray/session_*/artifacts/*/<experiment>/driver_artifacts/`,
    checked against Ray 2.60.
    Guarded by:
    tests/test_search_units.py::test_resume_copies_the_sweep_state_again_when_a_killed_driver_left_it_cut_short.
    """
    temp = ray_temp_dir()
    yield from temp.glob(f"session_*/artifacts/*/{experiment}/driver_artifacts/{state_file}")


def ray_temp_dir() -> Path:
    """Where a local Ray cluster keeps its sessions (the staging folders above among them)."""
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"


def auth_token_headers() -> dict[str, str]:
    """The HTTP header Ray's own clients send to a token-authenticated cluster: from
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, read afresh. Empty without a token.

    Why: Ray's job-submission client sends no token of its own to a cluster that demands one.
    Private: `ray._raylet.AuthenticationTokenLoader`, checked against Ray 2.60.
    Guarded by: tests/test_submit.py::test_the_token_is_found_as_ray_finds_it_and_disabled_sends_none.

    Raises:
        ray.exceptions.AuthenticationError: RAY_AUTH_TOKEN_PATH names a missing or empty file.
    """
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # read the environment and files as they are now
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


def wandb_logging_parts() -> tuple[type, type, Callable[[], dict]]:
    """`(_WandbLoggingActor, _QueueItem, _force_on_current_node)` of Ray's W&B integration.

    Why: one W&B run per trial with our epoch axis, the end-of-trial table and summary
    (`tracking._TrialRun` subclasses the logging actor), on the driver's node.
    Private: `ray.air.integrations.wandb._WandbLoggingActor` and `_QueueItem`,
    `ray.air.util.node._force_on_current_node`, checked against Ray 2.60.
    Guarded by: tests/test_wandb.py::test_a_trial_run_has_epoch_axis_best_summary_and_per_class_table and
    tests/test_search.py::test_asha_sweeps_in_a_row_complete_give_every_resource_back_and_log_every_trial_to_wandb.
    """
    from ray.air.integrations.wandb import _QueueItem, _WandbLoggingActor
    from ray.air.util.node import _force_on_current_node

    return _WandbLoggingActor, _QueueItem, _force_on_current_node


def optuna_contains(distribution, value) -> bool:
    """Whether an Optuna distribution holds `value` (False for one it cannot even represent).

    Why: the report rebuilds the sweep's study from its leaderboard, and a value a changed space
    no longer holds must be told apart.
    Private: `BaseDistribution._contains`, checked against Optuna 5.0.0.
    Guarded by: tests/test_report.py::test_the_study_is_rebuilt_as_the_searcher_saw_it.
    """
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def job_placement_groups(job_id: str) -> list[str]:
    """Hex ids of the placement groups job `job_id` created that are still alive (placed or waiting).

    Why: at the end of a sweep no trial of it runs, so a placement group its job still holds
    belongs to a Train run whose trial process was killed (a trial cut off by the time budget or
    stopped by Tune) and waits for Train's detached cleaner, which polls the State API and can lag
    for minutes on a loaded node. `sweep.wait_for_release` removes them.
    Private: a `PlacementGroupID` ends with the id of the job that created it; placement groups are
    made alive from `ray._raylet.PlacementGroupID` (`remove_job_placement_group`). Checked against Ray 2.60.
    Guarded by: tests/test_search_units.py::test_placement_groups_a_sweep_left_behind_are_found_by_job_and_removed.
    """
    from ray.util.placement_group import placement_group_table

    alive = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")
    return sorted(pg for pg, info in placement_group_table().items()
                  if info.get("state") in alive and pg.endswith(job_id))


def remove_job_placement_group(placement_group_id: str) -> None:
    """Removes the placement group with this hex id (see `job_placement_groups`)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(placement_group_id)))


def optuna_trial_of(searcher, trial_id: str):
    """The Optuna trial behind a Tune trial in Ray's `OptunaSearch`, or None once it was told.

    Why: Tune hands a trial's last result to `on_trial_complete` only, never to
    `on_trial_result`, so the stored study (optuna.db) lacked every trial's last epoch;
    `sweep.AshaAwareOptunaSearch` reports it before the trial is told.
    Private: `OptunaSearch._ot_trials` and `_completed_trials`, checked against Ray 2.60.
    Guarded by:
    tests/test_search.py::test_asha_sweeps_in_a_row_complete_give_every_resource_back_and_log_every_trial_to_wandb
    (a value per epoch for every trial in the stored study).
    """
    if trial_id in searcher._completed_trials:
        return None
    return searcher._ot_trials.get(trial_id)


def quiet_start_notices() -> None:
    """Leaves out what Ray, Tune and Optuna print at a sweep's start that tells a user nothing to
    act on: Ray's notice that token authentication is on (it stays on), Tune's configuration box
    with its "SearchGenerator", its TensorBoard hint into Ray's session folder, and Optuna's
    "A new study created" line. The sweep prints its own plan and a line per event instead.

    Private: the logger of `ray._private.authentication.authentication_token_setup`, and Tune's
    `RAY_AIR_NEW_OUTPUT=0` (its older reporter, which prints nothing at `verbose=0`). Checked
    against Ray 2.60. A user's own RAY_AIR_NEW_OUTPUT wins.
    Guarded by:
    tests/test_search.py::test_a_multi_objective_sweep_trades_its_objective_against_latency_over_two_backbones.
    """
    import logging

    import optuna

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
