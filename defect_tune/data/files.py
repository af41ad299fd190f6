"""Walking a folder as every reader and `predict` do: one rule for links (each followed once, a
link back up the tree listed, not entered), and every entry that is no readable file (a dangling
link, a FIFO, a device) named rather than dropped."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an image file, or None for a regular file (through links).
    Checked before opening: reading a FIFO would wait forever for a writer."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling link (to {os.readlink(path)}, which does not exist)"
        return "image file not found"
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    return f"not a regular file: {kind}"


@dataclass
class Walk:
    """What `walk_files` found: `files`, each real file once; `again`, each later path that
    reaches a file of `files` a second time (through a link), with that first path; `problems`,
    entries that are no readable file (dangling links, FIFOs, devices, links back up the tree)."""

    files: list[Path] = field(default_factory=list)
    again: dict[Path, Path] = field(default_factory=dict)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def walk_files(root: Path) -> Walk:
    """Every file below `root`, sorted, following symlinked folders (a shared drive often links
    class folders in from elsewhere; `rglob` does not follow them).

    One rule for links: each is followed at most once, so a folder linked in from two places is
    walked under both (its files then show up in `again`, for the caller to judge what two paths
    to one file mean), while a link back up the tree is not entered and is listed. Nothing found
    is dropped in silence: what is not a readable file is in `problems`."""
    root = Path(root)
    above: dict[str, frozenset[str]] = {}  # a folder's path -> the real paths of it and its parents
    entries: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for directory, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        parents = above.get(os.path.dirname(directory), frozenset()) if directory != str(root) else frozenset()
        if real in parents:
            problems.append((Path(directory), f"link back up the tree (to {real}): not entered again"))
            folders[:] = []
            continue
        above[directory] = parents | {real}
        folders.sort()
        entries.extend(Path(directory) / name for name in names)
    walk = Walk(problems=problems)
    reaching: dict[str, list[Path]] = {}  # a real file -> the paths that reach it
    for path in sorted(entries):
        if (problem := file_problem(path)) is not None:
            walk.problems.append((path, problem))
        else:
            reaching.setdefault(os.path.realpath(path), []).append(path)
    for real, paths in reaching.items():
        # The file under its own name where the tree holds it, else the first path to it.
        first = next((p for p in paths if os.path.abspath(p) == real), paths[0])
        walk.files.append(first)
        walk.again.update((p, first) for p in paths if p != first)
    walk.files.sort()
    walk.problems.sort()
    return walk
