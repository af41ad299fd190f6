"""The sweep's report relay: how a trial's Train runs hand their reports to the trial.

A Train callback runs in the run's controller, a process of its own; the trial hands reports to
Tune from its own thread (`trial.fit_and_report`). Between them sits one Ray actor per sweep.
Light on purpose: that actor's process imports this module, not torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid

import ray

ACTOR_NAME = "defect_tune_report_relay"


class ReportRelay:
    """Every trial's Train runs put their reports here, under a key of the trial's, and the trial
    takes them. One per sweep, started by the driver on its own node (`start_report_relay`): a Ray
    queue actor per trial would be one more process per trial, with its own CPU and memory to
    start (results/benchmarks/trial_cpu.md)."""

    def __init__(self):
        self._queues: dict[str, tuple[collections.deque, asyncio.Event]] = {}
        self._closed: set[str] = set()  # a few dozen bytes per trial attempt

    def _queue(self, key: str) -> tuple[collections.deque, asyncio.Event]:
        return self._queues.setdefault(key, (collections.deque(), asyncio.Event()))

    async def put(self, key: str, item) -> None:
        """Queues `item`; one for a closed key (a trial that has ended) is dropped."""
        if key in self._closed:
            return
        items, arrived = self._queue(key)
        items.append(item)
        arrived.set()

    async def is_open(self, key: str) -> bool:
        """False once the trial has closed `key`: its Train runs should stop (`--cv` folds)."""
        return key not in self._closed

    async def take(self, key: str, timeout: float) -> list:
        """Every item queued under `key`, in order, waiting up to `timeout` seconds for the first."""
        items, arrived = self._queue(key)
        if not items and timeout > 0:
            arrived.clear()  # no await since `items` was read: nothing was put in between
            try:
                await asyncio.wait_for(arrived.wait(), timeout)
            except TimeoutError:
                pass
        taken = list(items)
        items.clear()
        return taken

    async def close(self, key: str) -> None:
        """Forgets `key` (a trial that has taken its last report, or ended) and drops what comes later."""
        self._queues.pop(key, None)
        self._closed.add(key)


def start_report_relay():
    """The sweep's `ReportRelay`, on this (the driver's) node: it lives while the returned handle
    does, and a trial on a node that is lost takes nothing else with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ReportRelay).options(name=ACTOR_NAME, get_if_exists=True, num_cpus=0,
                                          scheduling_strategy=node).remote()


@contextlib.contextmanager
def trial_report_queue():
    """From inside a trial: the sweep's `ReportRelay` and a new key for this attempt (a retried
    trial's old run may still put under its own), closed when the block ends."""
    try:
        relay = ray.get_actor(ACTOR_NAME)
    except ValueError:
        raise RuntimeError(f"no {ACTOR_NAME} actor: trials run under `defect-tune search`, which starts it") from None
    key = uuid.uuid4().hex
    try:
        yield relay, key
    finally:
        relay.close.remote(key)
