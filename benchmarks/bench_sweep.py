"""How much of a plain PyTorch loop's throughput a whole sweep delivers, and where trial start-up goes.

    python benchmarks/bench_sweep.py [--data DIR] [--model el_cnn] [--trials 8] [--epochs 3] [--batch 64]
                                     [--gpu] [--at-once N[,N...]] [--repeats 1] [--grace 1]
                                     [--write results/benchmarks/sweep_efficiency.md]

On the lent GPU machine, `benchmarks/device_sweep.sh` runs it (see there).

One invocation, on the same prepared data, model and batch size:

1. Plain loop: the train split as one tensor in memory (on the GPU with --gpu), the model built
   as trials build it, AdamW and BCE, no augmentation; images/s over the epochs after the first.
   On a GPU: bf16 autocast and channels_last, as trials train there.
2. Sweep: a real `defect-tune search` of `--trials` trials (ASHA, grace `--grace`) with the same model,
   batch size and no augmentation; each trial a TorchTrainer fed by Ray Data. Its images/s is
   every trained image (epochs x train images, over all trials) divided by the wall time from the
   first trial's start to the last report.
3. Start-up per trial, from the timestamps trials report (`startup/*`): trial start to its
   Datasets built, then to the worker loop (TorchTrainer's controller, placement group, worker
   process), worker loop to the
   model ready (training imports, model, DDP), model ready to the first batch (Ray Data), and
   the first epoch's training after that batch.
4. With --gpu, the GPU's busy fraction over the sweep, sampled through NVML every 0.2 s.

`--at-once 1,2,3` runs 1, 2 and 3 trials side by side in turn (`--repeats` times, alternating),
each run measuring its own plain loop first (this shared machine's speed drifts by 20 % within
an hour), and prints the settings in columns with their images/s against the first's. With
`--grace` equal to `--epochs` ASHA stops no trial, so every setting trains the same epochs;
ASHA's decisions otherwise depend on which trial reports first.

Default data: the embedded synthetic set at 64 px (generated into a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from common import Sampler, data_or_synthetic, each, emit, machine

from defect_tune.search.options import SearchOptions
from defect_tune.search.resources import cpus_for_workers, trials_at_once

STARTUP = {
    "startup/datasets_s": "trial start → its Ray Datasets built (in Tune's trial actor)",
    "startup/trainer_s": "Datasets built → worker loop (controller, placement group, worker process)",
    "startup/model_s": "worker loop → model ready (training imports, model, DDP)",
    "startup/first_batch_s": "model ready → first batch (Ray Data)",
}


def plain_loop(data: Path, model: str, epochs: int, device: str, batch: int) -> float:
    """Images/s of a plain loop over the train split held in memory (after a warm-up epoch)."""
    import torch

    from defect_tune.core.config import load_config
    from defect_tune.data.shards import load_split, read_meta, to_tensor
    from defect_tune.training.models import build_model

    meta = read_meta(data)
    images, labels, _ = load_split(data, "train", meta)
    x, y = to_tensor(images).to(device), torch.from_numpy(labels).to(device)
    config = load_config(None, {"model": model, "batch_size": batch})
    net = build_model(config, len(meta["classes"])).to(device)
    gpu = device == "cuda"
    if gpu:
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    seconds = []
    for _ in range(epochs + 1):
        order = torch.randperm(len(x), device=device)
        started = time.perf_counter()
        for start in range(0, len(x) - batch + 1, batch):
            index = order[start:start + batch]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
                loss = loss_fn(net(x[index]).float(), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    trained = (len(x) // batch) * batch
    return trained / statistics.median(seconds[1:])


class GpuBusy(Sampler):
    """The GPU's utilisation, sampled through NVML in a thread while the sweep runs."""

    period = 0.2

    def __init__(self):
        super().__init__()
        self.samples = []
        try:  # nvidia-ml-py; without it the sweep is still measured (a GPU run is too dear to lose)
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as error:  # noqa: BLE001 - ImportError, or NVML's own errors
            print(f"GPU busy fraction not measured: {error!r}", flush=True)
            self.handle = None

    def sample(self) -> bool | None:
        if self.handle is None:
            return False
        self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        return None

    @property
    def fraction(self) -> float | None:
        return statistics.fmean(self.samples) / 100 if self.samples else None


def run_sweep(data: Path, model: str, trials: int, epochs: int, batch: int, scratch: Path, extra: list[str],
              timeout: float | None = None, grace: int = 1) -> dict:
    """The sweep's reported rows; with `timeout`, the search is interrupted then (as by Ctrl-C)
    and the rows its trials reported so far are kept (`cut`)."""
    scratch.mkdir(parents=True, exist_ok=True)
    space = scratch / "space.yaml"
    space.write_text(yaml.safe_dump({
        "num_samples": trials, "max_epochs": epochs, "asha": {"grace_period": grace, "reduction_factor": 2},
        "fixed": {"model": model, "batch_size": batch, "augment": "none", "warmup_epochs": 0,
                  "early_stopping_patience": 0},
        "params": {"loss": {"choice": ["bce", "weighted_bce"]}, "lr": {"loguniform": [3e-4, 3e-3]}},
    }, sort_keys=False))
    out = scratch / "sweep"
    started = time.perf_counter()
    command = [sys.executable, "-m", "defect_tune", "search", "--data", str(data), "--space", str(space),
               "--name", "efficiency", "--out", str(out), *extra]
    log = scratch / "search.log"
    with open(log, "w") as output:
        search = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            search.wait(timeout=timeout)
            cut = False
        except subprocess.TimeoutExpired:  # as Ctrl-C: Tune stops the trials and the search stops its Ray
            search.send_signal(signal.SIGINT)
            search.wait(timeout=120)
            cut = True
    if search.returncode and not cut:
        sys.exit(f"the sweep failed (exit {search.returncode}):\n{log.read_text()[-8000:]}")
    packed = [line for line in log.read_text().splitlines()
              if line.startswith("--trials-per-gpu auto: ") and "per GPU" in line]
    command_wall = time.perf_counter() - started
    tables = [pd.read_csv(p) for p in (out / "tune" / "efficiency").glob("run_trial_*/progress.csv")
              if p.stat().st_size]
    if not tables:
        sys.exit(f"the sweep reported nothing in {command_wall:.0f} s")
    return {"rows": pd.concat(tables), "command_wall": command_wall, "cut": cut,
            "packed": packed[-1].removeprefix("--trials-per-gpu auto: ") if packed else None}


def at_once_options(at_once: int | str | None, gpu: bool) -> tuple[list[str], str]:
    """`search`'s options for `at_once` trials side by side, and the setting's name. CPU: the CPUs
    `search` leaves to workers, shared equally; GPU: 1/`at_once` of the GPU each, or "auto":
    `search --trials-per-gpu auto`. None: `search`'s own defaults."""
    cpus = os.cpu_count() or 1
    if at_once == "auto":
        if not gpu:
            sys.exit("--at-once auto packs trials on a GPU by their measured memory: it needs --gpu")
        return ["--trials-per-gpu", "auto"], "auto per GPU"
    if at_once is None:
        count = trials_at_once({"CPU": cpus}, SearchOptions(data="", space=Path(), name=""))
        return [], f"search's defaults ({count} at once)"
    if gpu:
        return ["--gpus-per-worker", f"{1 / at_once:g}", "--max-concurrent", str(at_once)], f"{at_once} per GPU"
    cpus_each = f"{cpus_for_workers(cpus) / at_once:.4g}"
    return (["--cpus-per-worker", cpus_each, "--max-concurrent", str(at_once)],
            f"{at_once} at once ({cpus_each} CPU each)")


def one_run(args, data: Path, train_images: int, extra: list[str], scratch: Path) -> dict:
    """The plain loop, then the sweep, on the same data: one cell of each setting's column."""
    plain = plain_loop(data, args.model, max(args.epochs, 2), "cuda" if args.gpu else "cpu", args.batch)
    print(f"plain loop: {plain:,.0f} images/s; sweep with {' '.join(extra) or 'search defaults'}", flush=True)
    with GpuBusy() if args.gpu else contextlib.nullcontext() as busy:
        sweep = run_sweep(data, args.model, args.trials, args.epochs, args.batch, scratch, extra, args.sweep_timeout,
                          args.grace)
    rows = sweep["rows"]
    span = rows["timestamp_s"].max() - rows["trial_started_s"].min()
    rate = len(rows) * (train_images // args.batch) * args.batch / span
    first = rows.sort_values("epoch").groupby("trial_id").first()
    later = rows[rows["epoch"] > 1]
    return {"plain": plain, "rate": rate, "ratio": rate / plain, "span": span, "trial_epochs": len(rows),
            "cut": sweep["cut"], "command_wall": sweep["command_wall"], "busy": busy.fraction if busy else None,
            "packed": sweep["packed"],
            **{key: first[key].median() for key in STARTUP},
            # A first epoch's epoch_s also counts the wait for its first batch (startup/first_batch_s).
            "first_epoch": (first["epoch_s"] - first["startup/first_batch_s"]).median(),
            "later_epoch": later["epoch_s"].median() if len(later) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `prepare` output (default: synthetic, 64 px)")
    parser.add_argument("--model", default="el_cnn")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="batch size of the plain loop and of every trial")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (plain loop and trials)")
    parser.add_argument("--at-once", default=None,
                        help="trials side by side, or several comma-separated settings run in turn (e.g. 1,2,3): on "
                             "CPU each worker gets an equal part of the CPUs `search` leaves to workers, with --gpu an "
                             "equal part of the GPU, or auto: `search --trials-per-gpu auto` (default: `search`'s own "
                             "defaults)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting, the settings alternating")
    parser.add_argument("--grace", type=int, default=1,
                        help="ASHA's grace period (--epochs: no trial is stopped early, so every setting trains the "
                             "same)")
    parser.add_argument("--keep-train-gb", type=float, default=None,
                        help="search's --keep-train-gb (0: every epoch streams the train shard from Ray Data, the "
                             "baseline)")
    parser.add_argument("--sweep-timeout", type=float, default=None,
                        help="stop the sweep after this many seconds and report what its trials had reported")
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    settings = ([None] if args.at_once is None
                else [value if value == "auto" else int(value) for value in args.at_once.split(",")])
    options = [at_once_options(value, args.gpu) for value in settings]
    keep = [] if args.keep_train_gb is None else ["--keep-train-gb", f"{args.keep_train_gb:g}"]
    runs: list[list[dict]] = [[] for _ in settings]
    with tempfile.TemporaryDirectory(prefix="dt-bench-") as tmp:
        scratch = Path(tmp)
        data = data_or_synthetic(args.data, scratch)
        from defect_tune.data.shards import read_meta

        train_images = read_meta(data)["splits"]["train"]["images"]
        for repeat in range(args.repeats):
            for index, (extra, _) in enumerate(options):
                runs[index].append(one_run(args, data, train_images, extra + keep, scratch / f"run{repeat}_{index}"))

    rows = [
        ("plain loop, data in memory, images/s", "plain", ",.0f"),
        ("sweep, images/s (first trial's start to last report)", "rate", ",.0f"),
        ("**sweep / plain loop**", "ratio", ".3f"),
        ("sweep, seconds", "span", ".0f"),
        ("trial-epochs trained", "trial_epochs", ".0f"),
        ("GPU busy over the sweep", "busy", ".0%"),
        ("`defect-tune search` command wall (with Ray's start and stop), s", "command_wall", ".0f"),
        *((f"{label}, s (median over trials)", key, ".1f") for key, label in STARTUP.items()),
        ("first epoch's training and validation after its first batch, s", "first_epoch", ".1f"),
        ("a later epoch, s", "later_epoch", ".1f"),
    ]
    if any(run["packed"] for column in runs for run in column):
        rows.append(("`--trials-per-gpu auto` measured", "packed", "s"))
    names = [name for _, name in options]
    lines = [
        "# Sweep efficiency: a whole sweep's images/s against a plain loop's",
        "",
        machine(),
        f"Command: `{' '.join(['python', 'benchmarks/bench_sweep.py', *sys.argv[1:]])}`",
        f"Data: {args.data or 'synthetic, 64 px'} ({train_images} train images); model {args.model}, "
        f"batch {args.batch}, no augmentation; {args.trials} trials, up to {args.epochs} epochs, "
        f"ASHA grace {args.grace}"
        f"{'; ' + ' '.join(keep) if keep else ''}. Each run measures the plain loop, then its sweep"
        f"{'; the settings alternate, each cell lists the runs in order' if args.repeats > 1 else ''}"
        + ("; a sweep cut at --sweep-timeout counts what its trials had reported"
           if any(r['cut'] for rs in runs for r in rs) else "") + ".",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *(f"| {label} | " + " | ".join(each(column, key, fmt) for column in runs) + " |" for label, key, fmt in rows),
    ]
    if len(settings) > 1:
        base = statistics.fmean(run["rate"] for run in runs[0])
        lines += ["", f"Sweep images/s against {names[0]} (ratio of the means): "
                  + ", ".join(f"{name} {statistics.fmean(run['rate'] for run in column) / base:.2f}"
                              for name, column in zip(names[1:], runs[1:])) + "."]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
