"""How many trials run at once, and on which share of a CPU or GPU, from the cluster's resources;
giving every resource back when a sweep ends."""

from __future__ import annotations

import math
import time

import ray
from rich.console import Console

from defect_tune.ray_compat import job_placement_groups, remove_job_placement_group
from defect_tune.raytrain.cluster import gpus_per_worker
from defect_tune.raytrain.loop_config import check_gpu_share
from defect_tune.search.options import SearchError, SearchOptions
from defect_tune.search.space import SearchSpace


def cpus_for_workers(cpus: float) -> float:
    """The CPUs that trials' workers may reserve: all but a quarter, at least one, which is left
    unreserved for Ray Data's tasks (`trials_at_once`)."""
    return cpus - max(1.0, cpus / 4)


def trials_at_once(resources: dict, options: SearchOptions, folds: int = 0) -> int:
    """How many trials run side by side with cores to spare for Ray Data.

    Each trial's workers take `workers * cpus_per_worker` CPUs (and GPUs); the trial function
    itself takes none, and neither do Ray Data's tasks (`ingest.build_datasets`), so no count can
    starve them. They still need cores to run on: a quarter of the CPUs, at least one, is left
    unreserved for them, unless that leaves no room for even one trial.
    """
    if options.max_concurrent:
        return options.max_concurrent
    cpus = resources.get("CPU", 0)
    share = gpus_per_worker(options.gpus_per_worker, resources)
    per_trial = options.workers_per_trial * options.cpus_per_worker * max(folds, 1)  # a trial's folds run side by side
    by_cpu = math.floor(cpus_for_workers(cpus) / per_trial) if per_trial else 1_000_000
    by_gpu = 1_000_000
    if share > 0:
        by_gpu = math.floor(resources.get("GPU", 0) / (options.workers_per_trial * share * max(folds, 1)))
    count = min(by_cpu, by_gpu)
    if count < 1 and folds and cpus >= options.workers_per_trial * options.cpus_per_worker and (
            share == 0 or resources.get("GPU", 0) >= options.workers_per_trial * share):
        count = 1  # the trial's folds take turns; its fold-mean follows the slowest fold
    if count < 1 and by_gpu >= 1 and cpus >= per_trial:
        count = 1  # no spare core: Data shares the workers'
    if count < 1:
        raise SearchError(
            f"the cluster ({resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs) cannot run one trial of "
            f"{options.workers_per_trial} worker(s) x {options.cpus_per_worker} CPU / {share} GPU"
        )
    return count


def folds_side_by_side(resources: dict, options: SearchOptions, folds: int) -> str | None:
    """A note when one trial's folds cannot all train at once on this cluster, with the
    --cpus-per-worker at which they would; None when they can."""
    cpus = resources.get("CPU", 0)
    usable = cpus_for_workers(cpus)
    need = options.workers_per_trial * options.cpus_per_worker * folds
    if need <= max(usable, 0) or usable <= 0:
        return None
    fits = math.floor(usable / (options.workers_per_trial * folds) * 10) / 10
    advice = f"; --cpus-per-worker {fits:g} runs them side by side" if fits > 0 else ""
    return (f"note: a trial's {folds} folds need {need:g} CPUs, more than the {usable:g} left for workers: "
            "folds take turns, so ASHA sees a trial's first fold-mean "
            f"only when its last fold has trained an epoch{advice}")


# The share of a GPU's memory that `--trials-per-gpu auto` fills with measured workers; the rest
# is for what the measurement does not see: fragmentation and validation's batches.
GPU_MEMORY_FILL = 0.85


def gpu_share(trials_per_gpu: int) -> float:
    """A worker's GPU fraction when `trials_per_gpu` workers share each GPU, rounded down to
    Ray's resolution (0.0001) so that all of them fit."""
    return math.floor(10_000 / trials_per_gpu) / 10_000


def fit_on_gpu(peaks: dict[str, int], total: int) -> int:
    """How many workers of the hungriest backbone in `peaks` (bytes each) fit on a GPU of
    `total` bytes."""
    model, peak = max(peaks.items(), key=lambda item: item[1])
    count = math.floor(GPU_MEMORY_FILL * total / peak)
    if count < 1:
        raise SearchError(
            f"--trials-per-gpu auto: {model} takes {peak / 2**30:.1f} GiB at the space's largest settings, more than "
            f"{GPU_MEMORY_FILL:.0%} of the GPU's {total / 2**30:.1f} GiB; lower the space's batch_size"
        )
    return count


def _gpu_memory(configs: list, meta: dict) -> dict:
    """Runs on a GPU node (`measure_gpu_memory`)."""
    import torch

    from defect_tune.training.train import training_memory

    if not torch.cuda.is_available():
        raise RuntimeError(f"node {ray.util.get_node_ip_address()} offers Ray a GPU, but torch sees no CUDA device")
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    peaks = {config.model: training_memory(config, meta, device) for config in configs}
    return {"gpu": properties.name, "total": properties.total_memory, "peaks": peaks,
            "batch_size": configs[0].batch_size}


def measure_gpu_memory(space: SearchSpace, meta: dict, timeout: float = 900.0) -> dict:
    """Each backbone's peak memory at the space's largest settings (`largest_configs`), measured
    on one whole GPU of the cluster before any trial takes one (where an autoscaler adds GPU
    nodes, on the first one it adds: hence the long `timeout`)."""
    task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(_gpu_memory).remote(space.largest_configs(), meta)
    try:
        return ray.get(task, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(task, force=True)
        raise SearchError(f"--trials-per-gpu auto: no whole GPU came free within {timeout:g} s to measure the "
                          "backbones on; pass --trials-per-gpu N") from None
    except ray.exceptions.RayTaskError as error:
        raise SearchError(f"--trials-per-gpu auto: measuring the backbones failed: {error.cause!r}") from None


def gpus_for_workers(options: SearchOptions, space: SearchSpace, meta: dict, resources: dict,
                     console: Console) -> tuple[float, dict | None]:
    """Each worker's GPU share (`--gpus-per-worker`, or from `--trials-per-gpu`), and what
    `--trials-per-gpu auto` measured."""
    if options.trials_per_gpu is None:
        if options.gpus_per_worker == "auto":
            gpus = resources.get("GPU", 0)
            if gpus:
                console.print(f"training on the cluster's {gpus:g} GPU(s), one per worker "
                              "(--gpus-per-worker 0: CPUs only; "
                              "--trials-per-gpu auto: as many trials on each GPU as its memory holds)",
                              highlight=False, markup=False, soft_wrap=True)
            return gpus_per_worker("auto", resources), None
        if resources.get("GPU", 0) and not options.gpus_per_worker:
            console.print(f"note: the cluster has {resources['GPU']:g} GPU(s) and trials use none; "
                          "--trials-per-gpu auto trains on them", highlight=False, markup=False, soft_wrap=True)
        return options.gpus_per_worker, None
    if not resources.get("GPU", 0) and not options.max_concurrent:  # --max-concurrent: an autoscaler adds them
        raise SearchError(f"--trials-per-gpu {options.trials_per_gpu}: the cluster has no GPUs (where an autoscaler "
                          "adds GPU nodes as trials wait, pass --max-concurrent)")
    if options.trials_per_gpu != "auto":
        return gpu_share(options.trials_per_gpu), None
    console.print("--trials-per-gpu auto: measuring the space's backbones on one GPU", highlight=False, markup=False)
    measured = measure_gpu_memory(space, meta)
    measured["trials_per_gpu"] = count = fit_on_gpu(measured["peaks"], measured["total"])
    sizes = ", ".join(f"{model} {peak / 2**30:.1f} GiB" for model, peak in measured["peaks"].items())
    console.print(f"--trials-per-gpu auto: {count} per GPU ({measured['gpu']}, {measured['total'] / 2**30:.0f} GiB; "
                  f"at batch {measured['batch_size']}: {sizes})", highlight=False, markup=False, soft_wrap=True)
    return gpu_share(count), measured


def check_gpu_options(options: SearchOptions) -> None:
    """Refuse `--gpus-per-worker` and `--trials-per-gpu` values that cannot work, before Ray starts."""
    try:
        check_gpu_share(options.gpus_per_worker)
    except ValueError as error:
        raise SearchError(f"--gpus-per-worker {error}") from None
    value = options.trials_per_gpu
    if value is None:
        return
    if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise SearchError(f"--trials-per-gpu takes a positive number of workers per GPU or auto, got {value!r}")
    if options.gpus_per_worker not in (0, "auto"):
        raise SearchError(f"--trials-per-gpu {value} sets each worker's GPU share; drop --gpus-per-worker "
                          f"{options.gpus_per_worker:g}")


def wait_for_release(total: dict, timeout: float = 30.0) -> tuple[dict, int]:
    """Free resources once the sweep's trials have let go of theirs, and how many placement groups
    this had to remove itself. Train removes a finished run's placement group; one whose trial
    process was killed (cut off by the time budget) waits for Train's detached cleaner, which can
    lag for minutes on a loaded node. No trial of the sweep runs now, so after `timeout` every
    placement group this job still holds is such a leftover: removed here, and waited for again."""
    removed = 0
    for attempt in range(2):
        deadline = time.monotonic() + timeout
        while True:
            free = ray.available_resources()
            if all(free.get(k, 0) >= total[k] - 1e-6 for k in ("CPU", "GPU") if k in total):
                return free, removed
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if attempt == 0:
            leftovers = job_placement_groups(ray.get_runtime_context().get_job_id())
            for placement_group in leftovers:
                remove_job_placement_group(placement_group)
            removed = len(leftovers)
    return free, removed
