"""How much of a plain PyTorch loop's throughput a whole sweep delivers, and where trial start-up goes.

    python benchmarks/bench_sweep.py [--data DIR] [--model el_cnn] [--trials 8] [--epochs 3] [--batch 64]
                                     [--gpu] [--trials-per-gpu 4] [--write results/benchmarks/sweep_efficiency.md]

On the lent GPU machine, `benchmarks/device_sweep.sh` runs it (see there).

One invocation, on the same prepared data, model and batch size:

1. Plain loop: the train split as one tensor in memory (on the GPU with --gpu), the model built
   as trials build it, AdamW and BCE, no augmentation; images/s over the epochs after the first.
   On a GPU: bf16 autocast and channels_last, as trials train there.
2. Sweep: a real `defect-tune search` of `--trials` trials (ASHA, grace 1) with the same model,
   batch size and no augmentation; each trial a TorchTrainer fed by Ray Data. Its images/s is
   every trained image (epochs x train images, over all trials) divided by the wall time from the
   first trial's start to the last report.
3. Start-up per trial, from the timestamps trials report (`startup/*`): trial start to the
   worker loop (TorchTrainer's controller, placement group, worker process), worker loop to the
   model ready (training imports, model, DDP), model ready to the first batch (Ray Data), and
   the first epoch's training.
4. With --gpu, the GPU's busy fraction over the sweep, sampled through NVML every 0.2 s.

Default data: the embedded synthetic set at 64 px (generated into a temporary folder).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from common import Sampler, data_or_synthetic, emit, machine

STARTUP = {
    "startup/trainer_s": "trial start → worker loop (controller, placement group, worker process)",
    "startup/model_s": "worker loop → model ready (training imports, model, DDP)",
    "startup/first_batch_s": "model ready → first batch (Ray Data)",
}


def plain_loop(data: Path, model: str, epochs: int, device: str, batch: int) -> float:
    """Images/s of a plain loop over the train split held in memory (after a warm-up epoch)."""
    import torch

    from defect_tune.config import load_config
    from defect_tune.data import load_split, read_meta, to_tensor
    from defect_tune.models import build_model

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
        import pynvml

        super().__init__()
        pynvml.nvmlInit()
        self.nvml, self.handle, self.samples = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), []

    def sample(self) -> None:
        self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    @property
    def fraction(self) -> float:
        return statistics.fmean(self.samples) / 100 if self.samples else float("nan")


def run_sweep(data: Path, model: str, trials: int, epochs: int, batch: int, scratch: Path, extra: list[str],
              timeout: float | None = None) -> dict:
    """The sweep's reported rows; with `timeout`, the search is interrupted then (as by Ctrl-C)
    and the rows its trials reported so far are kept (`cut`)."""
    space = scratch / "space.yaml"
    space.write_text(yaml.safe_dump({
        "num_samples": trials, "max_epochs": epochs, "asha": {"grace_period": 1, "reduction_factor": 2},
        "fixed": {"model": model, "batch_size": batch, "augment": "none", "warmup_epochs": 0, "early_stopping_patience": 0},
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
    command_wall = time.perf_counter() - started
    tables = [pd.read_csv(p) for p in (out / "tune" / "efficiency").glob("run_trial_*/progress.csv") if p.stat().st_size]
    if not tables:
        sys.exit(f"the sweep reported nothing in {command_wall:.0f} s")
    return {"rows": pd.concat(tables), "command_wall": command_wall, "cut": cut}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `prepare` output (default: synthetic, 64 px)")
    parser.add_argument("--model", default="el_cnn")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="batch size of the plain loop and of every trial")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (plain loop and trials)")
    parser.add_argument("--trials-per-gpu", type=int, default=4, help="with --gpu: trials sharing the GPU")
    parser.add_argument("--keep-train-gb", type=float, default=None,
                        help="search's --keep-train-gb (0: every epoch streams the train shard from Ray Data, the baseline)")
    parser.add_argument("--sweep-timeout", type=float, default=None,
                        help="stop the sweep after this many seconds and report what its trials had reported")
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    extra = ["--cpus-per-worker", "1"]
    if args.gpu:
        extra = ["--gpus-per-worker", f"{1 / args.trials_per_gpu:g}", "--max-concurrent", str(args.trials_per_gpu)]
    if args.keep_train_gb is not None:
        extra += ["--keep-train-gb", f"{args.keep_train_gb:g}"]
    with tempfile.TemporaryDirectory(prefix="dt-bench-") as tmp:
        scratch = Path(tmp)
        data = data_or_synthetic(args.data, scratch)
        from defect_tune.data import read_meta

        meta = read_meta(data)
        train_images = meta["splits"]["train"]["images"]
        plain = plain_loop(data, args.model, max(args.epochs, 2), "cuda" if args.gpu else "cpu", args.batch)
        print(f"plain loop: {plain:,.0f} images/s", flush=True)
        if args.gpu:
            with GpuBusy() as busy:
                sweep = run_sweep(data, args.model, args.trials, args.epochs, args.batch, scratch, extra, args.sweep_timeout)
            busy_text = f"{busy.fraction:.0%}"
        else:
            sweep = run_sweep(data, args.model, args.trials, args.epochs, args.batch, scratch, extra, args.sweep_timeout)
            busy_text = "n/a (no GPU)"

    rows = sweep["rows"]
    span = rows["timestamp_s"].max() - rows["trial_started_s"].min()
    trained = len(rows) * (train_images // args.batch) * args.batch
    rate = trained / span
    first = rows.sort_values("epoch").groupby("trial_id").first()
    later = rows[rows["epoch"] > 1]
    lines = [
        "# Sweep efficiency: a whole sweep's images/s against a plain loop's",
        "",
        machine(),
        f"Command: `{' '.join(['python', 'benchmarks/bench_sweep.py', *sys.argv[1:]])}`",
        f"Data: {args.data or 'synthetic, 64 px'} ({train_images} train images); model {args.model}, batch {args.batch}, "
        f"no augmentation; {args.trials} trials, up to {args.epochs} epochs, ASHA grace 1; search options {' '.join(extra)}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| plain loop, data in memory | {plain:,.0f} images/s |",
        f"| sweep, first trial's start to last report ({span:.0f} s, {len(rows)} trial-epochs"
        f"{', cut at --sweep-timeout' if sweep['cut'] else ''}) | {rate:,.0f} images/s |",
        f"| sweep / plain | {rate / plain:.3f} |",
        f"| GPU busy over the sweep | {busy_text} |",
        f"| `defect-tune search` command wall (with Ray's start and stop) | {sweep['command_wall']:.0f} s |",
        "",
        "Per trial (median over trials):",
        "",
        "| part | seconds |",
        "|---|---|",
    ]
    for key, label in STARTUP.items():
        lines.append(f"| {label} | {first[key].median():.1f} |")
    lines.append(f"| first epoch's training and validation | {first['epoch_s'].median():.1f} |")
    if len(later):
        lines.append(f"| a later epoch | {later['epoch_s'].median():.1f} |")
    emit(lines, args.write)


if __name__ == "__main__":
    main()
