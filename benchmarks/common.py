"""What every benchmark's table shares: the machine line and how the table is printed and kept."""

from __future__ import annotations

import os
import platform
import threading
from datetime import date
from pathlib import Path


def machine() -> str:
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
            f"Date: {date.today().isoformat()}.")


def machine_details() -> str:
    """The machine in more words than `machine()`: CPU model, cores, memory, GPU, torch version. Date."""
    import shutil
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        gpu = ", ".join(query.stdout.split("\n")[:-1]) or gpu
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
            f"torch {torch}. Date: {date.today().isoformat()}.")


def emit(lines: list[str], write: Path | None) -> None:
    """Print the table; also write it as Markdown to `write` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(text)


def each(runs: list[dict], key: str, fmt: str) -> str:
    """A table cell listing one figure of every run, in order (`n/a` where a run has none)."""
    return " / ".join("n/a" if run[key] is None else f"{run[key]:{fmt}}" for run in runs)


NEU_DET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det"


def neu_det_or_synthetic(data: Path | None, scratch: Path) -> tuple[Path, str]:
    """`data` when given; else NEU-DET at 224 px prepared into `scratch` from ../shared/datasets
    when it is there, else the synthetic set at 64 px. With a description for the table."""
    if data is not None:
        return data, str(data)
    if not (NEU_DET / "Annotations").is_dir():
        return data_or_synthetic(None, scratch), "synthetic, 64 px"
    from defect_tune.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source=NEU_DET, format="voc", out=scratch / "data", image_size=224, workers=os.cpu_count()))
    return scratch / "data", "NEU-DET, 224 px"


def data_or_synthetic(data: Path | None, scratch: Path) -> Path:
    """`data` (a `prepare` output) when given; else the embedded synthetic set at 64 px, prepared into `scratch`."""
    if data is not None:
        return data
    from defect_tune.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source=scratch / "voc", format="synthetic", out=scratch / "data", image_size=64, workers=1))
    return scratch / "data"


class Sampler:
    """Calls `sample()` every `period` seconds in a thread while its `with` block runs; a sample
    that returns False ends the sampling."""

    period = 0.5

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> bool | None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            if self.sample() is False:
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def process_kind(title: str) -> str:
    """What a process is, from its title: a Ray worker's actor class or task name (`ray::TrainController`,
    `ray::IDLE` also for one still starting), else the program's name (raylet, gcs_server, python)."""
    if title.startswith("ray::"):
        return "ray::" + title[len("ray::"):].split(" ")[0].split(".")[0]
    if "default_worker.py" in title:  # a Ray worker that has not named itself yet
        return "ray::IDLE"
    words = title.split()
    scripts = [Path(word).name for word in words[1:] if word.endswith(".py")]  # python .../log_monitor.py
    return scripts[0] if scripts and Path(words[0]).name.startswith("python") else Path(words[0]).name if words else ""


class ProcessSampler(Sampler):
    """Every process under `root`, sampled in a thread: CPU seconds, peak RSS and kind per process
    (the last kind other than an idle Ray worker it was seen as), and peak RSS sums."""

    def __init__(self, root: int):
        super().__init__()
        self.root, self.cpu, self.peak_rss, self.peak_idle_rss, self.peak_idle = root, {}, 0, 0, 0
        self.kind: dict[int, str] = {}
        self.rss: dict[int, int] = {}

    def sample(self) -> bool:
        import psutil

        try:
            processes = psutil.Process(self.root).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        rss = idle_rss = idle = 0
        for process in processes:
            try:
                with process.oneshot():
                    times, memory, title = process.cpu_times(), process.memory_info().rss, " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pid = process.pid
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), times.user + times.system)
            self.rss[pid] = max(self.rss.get(pid, 0), memory)
            kind = process_kind(title)
            if kind and (kind != "ray::IDLE" or pid not in self.kind):  # no title: a process exiting
                self.kind[pid] = kind
            rss += memory
            if title.startswith("ray::IDLE"):  # idle now (one still starting is not counted)
                idle, idle_rss = idle + 1, idle_rss + memory
        self.peak_rss, self.peak_idle_rss = max(self.peak_rss, rss), max(self.peak_idle_rss, idle_rss)
        self.peak_idle = max(self.peak_idle, idle)
        return True

    def by_kind(self) -> dict[str, dict]:
        """Per kind: processes, their CPU seconds and their largest RSS."""
        kinds: dict[str, dict] = {}
        for pid, kind in self.kind.items():
            entry = kinds.setdefault(kind, {"processes": 0, "cpu": 0.0, "peak_rss": 0})
            entry["processes"] += 1
            entry["cpu"] += self.cpu.get(pid, 0.0)
            entry["peak_rss"] = max(entry["peak_rss"], self.rss.get(pid, 0))
        return kinds


def sampled_search(data: Path, space: Path, out: Path, name: str, log_path: Path, options: list[str] = (),
                   env: dict | None = None) -> ProcessSampler:
    """Runs `defect-tune search` while a `ProcessSampler` samples every process it starts; exits
    with the end of its log if it fails."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "defect_tune", "search", "--data", str(data), "--space", str(space),
               "--name", name, "--out", str(out), *options]
    with open(log_path, "w") as log:
        search = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        with ProcessSampler(search.pid) as sampler:
            search.wait()
    if search.returncode:
        sys.exit(f"the sweep failed (exit {search.returncode}):\n{log_path.read_text()[-6000:]}")
    return sampler
