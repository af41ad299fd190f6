"""Starting Ray for a driver (`search`, `retrain`): connect to a cluster, or start a local one
with the settings a local sweep needs, never a second local cluster beside a running one."""

from __future__ import annotations

import os

import ray

from defect_tune.core.errors import UserError
from defect_tune.ray_compat import IDLE_WORKER_KILL_MS, PREEMPTION_WATCHER, local_cluster_addresses


class ClusterError(UserError):
    """A Ray cluster this driver cannot use as asked; the message says which and what to do."""


def refuse_second_local_cluster(address: str | None) -> None:
    """Starting a local Ray cluster beside another one on this machine hangs sweeps: Train's
    placement-group cleaner finds its cluster through the State API without an address, fails
    with "Found multiple active Ray instances", and each stopped trial's CPUs stay reserved until
    Ray Data starves (seen here with two sweeps at once). Use the running one, or stop it."""
    if address is not None or os.environ.get("RAY_ADDRESS"):  # set for drivers of Ray jobs
        return
    running = local_cluster_addresses()
    if running:
        raise ClusterError(
            f"a Ray cluster is already running on this machine ({', '.join(running)}); pass --address "
            f"{running[0]} to use it, or stop it with `ray stop`: a second local cluster breaks Train's "
            "placement-group cleaner and hangs the sweep"
        )


# What the Ray processes of a local cluster that `search` or `retrain` starts itself are given,
# unless the user set it.
# - Train starts a preemption watcher actor per run (one more process per trial, with its own Ray
#   start-up) to notice nodes that an autoscaler drains. One machine, started here, has no
#   autoscaler and no node to drain.
# - The raylet kills a worker process idle for 1 s once the node has more workers than CPUs, which
#   a sweep always has (each trial is several actors). So every trial started new processes for
#   its Ray Data tasks and actors, each paying Ray's start-up, while the last trial's idle ones had
#   just been killed. Kept 60 s, they serve the next trial (benchmarks/bench_worker_pool.py).
LOCAL_CLUSTER_ENV = {PREEMPTION_WATCHER: "0", IDLE_WORKER_KILL_MS: "60000"}


def start_ray(address: str | None, **init) -> None:
    """`ray.init`, after refusing a second local cluster on this machine. A local cluster started
    here gets LOCAL_CLUSTER_ENV: its processes inherit this process's environment at start, which
    is then restored, so nothing else in this process sees it."""
    refuse_second_local_cluster(address)
    local = address is None and not os.environ.get("RAY_ADDRESS")
    added = {key: value for key, value in LOCAL_CLUSTER_ENV.items() if local and key not in os.environ}
    os.environ.update(added)
    try:
        ray.init(address=address, **init)
    finally:
        for key in added:
            os.environ.pop(key, None)


def gpus_per_worker(share: float | str, resources: dict) -> float:
    """A worker's GPU share: `share` as given, or for "auto" one GPU when the cluster (its
    `ray.cluster_resources()`) has any, else none."""
    if share == "auto":
        return 1.0 if resources.get("GPU", 0) else 0.0
    return float(share)
