"""Why a Ray Train run failed, in one line: Ray wraps a worker's exception in tracebacks of its
own, and a leaderboard, a model card or a message wants the innermost cause."""

from __future__ import annotations

import re

# The last line of a Python traceback: `package.module.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Loss|Exit|Interrupt)): (\S.*)$")


def error_reason(error: BaseException | str) -> str:
    """A failed trial's cause in one line, e.g. `NonFiniteLoss: epoch 1, batch 4: training loss
    is nan`: the innermost exception of the traceback Ray wraps it in (Tune's error.txt keeps the
    whole). Falls back to the error's own type and first line."""
    text = str(error)
    causes = [m for m in map(_EXCEPTION_LINE.match, (line.strip() for line in text.splitlines())) if m]
    if causes:
        name, message = causes[-1].groups()
    else:
        name = type(error).__name__ if isinstance(error, BaseException) else "Error"
        message = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{name}: {message}"[:500]
