"""What a configuration costs in production, measured on the model a trial trains: parameters,
FLOPs per image, inference latency per image, and peak training memory. The leaderboard carries
them beside the objective, so that a choice for a line can weigh recall against them."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LATENCY_BATCHES = (1, 32)
REPEATS = 5  # timed calls per batch size, after one warm-up; the median is kept


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms_per_item(run: Callable[[], object], items: int, repeats: int) -> float:
    """Median milliseconds per item over `repeats` timed calls of `run` (which handles `items`),
    after one warm-up call (which allocates and, for onnxruntime, plans)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000 / items)
    return statistics.median(times)


@torch.no_grad()
def model_cost(model: nn.Module, height: int, width: int, device: torch.device) -> dict:
    """`cost/params`, `cost/gflops_per_image` (multiply and add counted as two) and
    `cost/latency_ms_b<N>`: milliseconds per image at batch N, median of REPEATS, in eval mode
    on `device` (as the trial trains: float32 on the CPU). The model is left in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        cost = {"cost/params": sum(p.numel() for p in model.parameters())}
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, 1, height, width, device=device))
        cost["cost/gflops_per_image"] = counter.get_total_flops() / 1e9
        for batch in LATENCY_BATCHES:
            x = torch.zeros(batch, 1, height, width, device=device)
            cost[f"cost/latency_ms_b{batch}"] = median_ms_per_item(lambda: (model(x), _sync(device)), batch, REPEATS)
    finally:
        model.train(was_training)
    return cost


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of training so far: the GPU's allocated peak on CUDA; otherwise this process's
    peak resident size (the worker process holds the model, its batches and its shard)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
