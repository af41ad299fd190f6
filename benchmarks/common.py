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
