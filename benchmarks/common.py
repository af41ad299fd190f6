"""What every benchmark's table shares: the machine line and how the table is printed and kept."""

from __future__ import annotations

import os
import platform
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
