"""What a configuration costs (training/cost.py), measured on real models."""

import torch

from defect_tune.core.config import TrainConfig
from defect_tune.core.leaderboard import COSTS
from defect_tune.training.cost import model_cost, peak_memory_mb
from defect_tune.training.models import build_model


def test_cost_counts_parameters_and_flops_and_times_both_batch_sizes_leaving_the_mode_alone():
    small = build_model(TrainConfig(model="el_cnn", pretrained=False), 3)
    large = build_model(TrainConfig(model="resnet18", pretrained=False), 3)
    small.train()
    costs = {name: model_cost(model, 48, 64, torch.device("cpu"))
             for name, model in (("small", small), ("large", large))}
    assert small.training  # measured in eval mode, handed back in training mode
    for model, cost in ((small, costs["small"]), (large, costs["large"])):
        assert cost["cost/params"] == sum(p.numel() for p in model.parameters())
        assert cost["cost/latency_ms_b1"] > 0 and cost["cost/latency_ms_b32"] > 0
    assert costs["large"]["cost/params"] > 10 * costs["small"]["cost/params"]
    assert costs["large"]["cost/gflops_per_image"] > costs["small"]["cost/gflops_per_image"] > 0
    # FLOPs follow the image: a quarter of the pixels, about a quarter of a CNN's FLOPs.
    quarter = model_cost(large, 24, 32, torch.device("cpu"))["cost/gflops_per_image"]
    assert 0.15 < quarter / costs["large"]["cost/gflops_per_image"] < 0.35
    assert peak_memory_mb(torch.device("cpu")) > 50  # this process holds torch and two models
    # Every cost measured has a name where costs are listed (trade-offs, export, report), and no
    # name lacks its measurement (memory is reported per epoch by the worker).
    assert set(costs["small"]) | {"cost/peak_memory_mb"} == set(COSTS)
