"""The one error type for bad input, which the command line turns into one line and exit 2, and
the errors of the machine, which it turns into one line and exit 1."""

import errno
import tempfile
from pathlib import Path


class UserError(ValueError):
    """A file, option or value that cannot be used; the message names it and says why.

    Every stage's own error (`PrepareError`, `ConfigError`, `DataError`, ...) is one of these, and
    the command line catches them once, at its edge. Any other exception is a fault of ours and
    keeps its traceback. A ValueError so that library callers who caught ValueError still do.
    """


# Errors of the machine rather than of a command: a full disk, a read-only or foreign folder, a
# failing drive. Each is one line naming the path and the cause (cli.py), never a traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def environment_error(error: OSError) -> str | None:
    """The one line for an OSError the machine caused (see ENVIRONMENT_ERRNOS), else None."""
    if error.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f"{error.filename}: " if error.filename else ""
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EIO: "check the drive"}.get(error.errno, "check its permissions or write elsewhere")
    return f"{where}{error.strerror or error}; {hint}"


def check_writable(folder: Path, option: str) -> None:
    """Write and remove a probe file in `folder` (or, where it does not exist yet, in the
    nearest folder above it that does), before any work whose result would go there: a
    read-only or foreign folder is named now, not after an hour's work."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".defect-tune-probe-"):
            pass
    except OSError as error:
        raise UserError(f"{folder}: cannot write there ({error.strerror or error}); choose another {option}") from None


def file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists as a file, not a folder, so that nothing can be
    written at `path`; None when there is none. Every command's --out check names it."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def files_not_written_by(folder: Path, outputs: frozenset[str]) -> list[str]:
    """The entries of an existing --out folder that are not among a command's `outputs`, sorted:
    what writing there would overwrite or mix with. Empty when the folder does not exist."""
    folder = Path(folder)
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in outputs) if folder.is_dir() else []
