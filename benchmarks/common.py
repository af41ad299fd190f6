"""What every benchmark's table shares: the machine line and how the table is printed and kept."""

from __future__ import annotations

import os
import platform
import threading
from datetime import date
from pathlib import Path


def machine() -> str:
    return f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. Date: {date.today().isoformat()}."


def emit(lines: list[str], write: Path | None) -> None:
    """Print the table; also write it as Markdown to `write` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(text)


def data_or_synthetic(data: Path | None, scratch: Path) -> Path:
    """`data` (a `prepare` output) when given; else the embedded synthetic set at 64 px, prepared into `scratch`."""
    if data is not None:
        return data
    from defect_tune.prepare import PrepareOptions, prepare

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
