"""The one error type for bad input, which the command line turns into one line and exit 2."""

from pathlib import Path


class UserError(ValueError):
    """A file, option or value that cannot be used; the message names it and says why.

    Every stage's own error (`PrepareError`, `ConfigError`, `DataError`, ...) is one of these, and
    the command line catches them once, at its edge. Any other exception is a fault of ours and
    keeps its traceback. A ValueError so that library callers who caught ValueError still do.
    """


def file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists as a file, not a folder, so that nothing can be
    written at `path`; None when there is none. Every command's --out check names it."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)
