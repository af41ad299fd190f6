"""Where `prepare` writes: a lock on --out for the whole run, the checks of what --out holds
(at the start and again at the swap), staging folders beside it, and the swap that puts the new
output in place. Nothing a user put in --out, or beside it, is ever removed."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from rich.console import Console

from defect_tune.core.errors import UserError, file_in_the_way
from defect_tune.data.splits import SPLITS

# What prepare writes in --out; --overwrite replaces a folder holding nothing else.
OUTPUT_ENTRIES = frozenset({"meta.json", "bad_inputs.csv", *SPLITS})


class PrepareError(UserError):
    """A dataset that cannot be prepared; the message names the file and the problem."""


@contextlib.contextmanager
def lock_out(out: Path, command: str):
    """Hold `.OUT.lock` beside --out for the whole run, so that a second prepare of the same
    --out is refused, naming the first, instead of both writing and the last one winning.

    An flock: the kernel drops it when its process ends however it ends (SIGKILL included), so
    a stale lock file never blocks a rerun. Creating the file is also the first write beside
    --out, so a folder that cannot be written is named before any work."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")
        except OSError as error:
            raise PrepareError(f"{out}: cannot write beside it in {out.parent} "
                               f"({error.strerror or error}); choose another --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another prepare"
            handle.close()
            raise PrepareError(f"{out}: another prepare is writing this --out ({holder}); wait for it to end, "
                               "or choose another --out") from None
        try:  # the file this lock is on is still the one at that path (not unlinked by a run ending now)
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} started {dt.datetime.now().isoformat(timespec='seconds')}: {command}\n")
    handle.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        handle.close()


def check_out_dir(options) -> None:  # options: a prepare.PrepareOptions
    """Refuse an --out that would put the source at risk, or that --overwrite may not replace:
    only a folder holding nothing but an earlier prepare's output, apart from the source."""
    if os.path.islink(options.out):  # replacing it would replace the link, not what it points to
        raise PrepareError(f"{options.out}: --out is a symbolic link (to {os.readlink(options.out)}); "
                           "give the folder itself")
    out = options.out.resolve()
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{options.out}: --out is a file, not a folder")
    if (blocker := file_in_the_way(out)) is not None:
        raise PrepareError(f"{options.out}: --out lies under {blocker}, which is a file")
    if options.source is not None and options.format != "synthetic":
        source = options.source.resolve()
        if out == source or out in source.parents:
            raise PrepareError(f"{options.out}: --out holds the source {options.source}; choose a folder outside it")
        if options.overwrite and source in out.parents and out.exists():
            raise PrepareError(f"{options.out}: --overwrite would replace a folder inside the source {options.source}; "
                               "choose an --out outside it")
    if not out.exists() or not any(out.iterdir()):
        return
    if not options.overwrite:
        raise PrepareError(f"{options.out} already exists and is not empty; pass --overwrite to replace it")
    problem = not_a_prepare_output(out)
    if problem:
        raise PrepareError(f"{options.out}: {problem}; --overwrite only replaces an earlier prepare's output, refusing "
                           "to delete it")


def not_a_prepare_output(folder: Path) -> str | None:
    """Why `folder` is not recognisably an earlier prepare's output; None when it is."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError):
        return "its meta.json is not readable JSON"
    if not isinstance(meta, dict) or not {"format_version", "classes", "splits"} <= meta.keys():
        return "its meta.json is not one prepare wrote"
    others = sorted(entry.name for entry in folder.iterdir() if entry.name not in OUTPUT_ENTRIES)
    # Inside the split folders only the shards meta.json lists: a user's file dropped beside them
    # (or a folder linked in) would go with them.
    splits = meta["splits"] if isinstance(meta["splits"], dict) else {}
    shards = [split.get("shards") for split in splits.values() if isinstance(split, dict)]
    listed = {shard.get("file") for entries in shards if isinstance(entries, list)
              for shard in entries if isinstance(shard, dict) and isinstance(shard.get("file"), str)}
    for name in SPLITS:
        split = folder / name
        if split.is_symlink() or split.exists() and not split.is_dir():
            others.append(name)
        elif split.is_dir():
            others += sorted(str(path.relative_to(folder)) for path in split.rglob("*")
                             if path.is_symlink() or not path.is_dir() and str(path.relative_to(folder)) not in listed)
    if others:
        return f"it holds files prepare did not write: {', '.join(others[:5])}"
    return None


def clear_dead_staging(out: Path, console: Console | None) -> None:
    """Remove the staging folders (`.OUT.tmp-PID`, `.OUT.old-PID`) of earlier runs for this --out
    whose process is gone: a prepare killed outright (SIGKILL, out of memory) cannot remove its own."""
    for folder in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = folder.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: another prepare of the same --out is running; leave its folder alone
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, under another user
        shutil.rmtree(folder, ignore_errors=True)
        if console is not None:
            console.print(f"removed {folder}, the staging folder of an earlier prepare (process {pid}) that did not "
                          "finish")


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM (a job scheduler's stop, `kill`) ends prepare as Ctrl-C does: its staging folder
    and lock are removed and --out is left as it was. Python's default would end the process
    on the spot, leaving both for the next run to clear."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def swap_in(tmp: Path, out: Path, options) -> None:
    """Put the finished output in place of --out. What is there is checked again first: the
    check at the start does not cover what appeared in --out while prepare ran (a file the user
    put there, another program's output), and that is never removed."""
    try:
        check_out_dir(options)
    except PrepareError as error:
        raise PrepareError(f"{error} (it changed while prepare ran: nothing was replaced)") from None
    if not out.exists():
        tmp.rename(out)
        return
    # Rename the old output aside, then the new one in: --out is missing for an instant, never half-written.
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)
