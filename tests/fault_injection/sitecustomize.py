"""Fault injection for tests/test_faults.py, loaded by every Python process of the test's Ray
cluster through PYTHONPATH (Ray's workers inherit the driver's environment).

With DEFECT_TUNE_TEST_NAN_LR set, a trial whose `lr` equals it gets a training loss of NaN at its
fourth batch: the real loss times NaN, so the real training loop's own check fails the trial,
as a diverging configuration would. Nothing changes for any other trial or process. Each time
that trial's loss is built (once per training run of it, retries included), a line is appended
to the file DEFECT_TUNE_TEST_NAN_RUNS names. With DEFECT_TUNE_TEST_NAN_RANK, only that Train
worker's loss is poisoned; with DEFECT_TUNE_TEST_NAN_FOLD, only that fold's (a `--cv` trial's
Train run named `...-fold<N>`). With DEFECT_TUNE_TEST_SLOW_LR, a trial whose `lr` equals it
sleeps a second per training batch, so a test has whole seconds to act between two of its epochs.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

NAN_LR = os.environ.get("DEFECT_TUNE_TEST_NAN_LR")
SLOW_LR = os.environ.get("DEFECT_TUNE_TEST_SLOW_LR")


def _poison(module) -> None:
    import torch

    real_build_loss = module.build_loss

    class Poisoned(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss, self.calls = loss, 0

        def forward(self, logits, targets):
            self.calls += 1
            value = self.loss(logits, targets)
            return value * float("nan") if self.calls == 4 else value

    class Slowed(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, logits, targets):
            time.sleep(1.0)
            return self.loss(logits, targets)

    def build_loss(config, counts):
        loss = real_build_loss(config, counts)
        if SLOW_LR and config.lr == float(SLOW_LR):
            return Slowed(loss)
        if config.lr != float(NAN_LR):
            return loss
        if os.environ.get("DEFECT_TUNE_TEST_NAN_RANK"):  # only this worker's loss, under DDP
            import ray.train

            if ray.train.get_context().get_world_rank() != int(os.environ["DEFECT_TUNE_TEST_NAN_RANK"]):
                return loss
        if os.environ.get("DEFECT_TUNE_TEST_NAN_FOLD"):  # only this fold's Train run
            import ray.train

            if not ray.train.get_context().get_experiment_name().endswith(
                    f"-fold{os.environ['DEFECT_TUNE_TEST_NAN_FOLD']}"):
                return loss
        with open(os.environ["DEFECT_TUNE_TEST_NAN_RUNS"], "a") as runs:
            runs.write(f"{os.getpid()}\n")
        return Poisoned(loss)

    module.build_loss = build_loss


class _PatchTrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "defect_tune.training.engine":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def exec_and_poison(module):
            exec_module(module)
            _poison(module)

        spec.loader.exec_module = exec_and_poison
        return spec


if NAN_LR:
    sys.meta_path.insert(0, _PatchTrain())
