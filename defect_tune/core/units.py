"""Durations as people type and read them: `--time-budget 20m` in, `3m12s` out, the same way in
the console, the messages and the report."""

from __future__ import annotations

import math
import re


def clock(seconds: float) -> str:
    """`45s`, `3m12s`, `20m`, `1h05m`, `2h`: a duration as a person reads a clock, to the second
    under an hour and to the minute above."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes}m{rest:02d}s" if rest else f"{minutes}m"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


def parse_duration(text: str) -> float:
    """Seconds in a duration: `90s`, `20m`, `1.5h`, or a plain number of seconds.

    Raises:
        ValueError: anything else, zero, or a value too large to be finite.
    Example:
        >>> parse_duration("1.5h")
        5400.0
    """
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([smh]?)", text.strip().lower())
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)] if match else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{text!r}: expected a positive duration such as 90s, 20m, 1.5h or 600 (seconds)")
    return seconds
