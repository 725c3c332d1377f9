"""Temporary files named after the process that writes them, the sweep of those a killed
process left behind, and the one all-or-none writer of result files: the rule for the
image cache, the submissions and the tables the commands write.

A file being written is a sibling of its final path (so ``os.replace`` is atomic) whose
name carries the writer's process id; a process killed outright (``kill -9``) cannot clean
up, so the next writer of the same file removes temporaries whose process no longer runs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from svhn.errors import OutputExistsError

__all__ = ["held_lock", "process_alive", "refuse_existing", "sweep_stale",
           "write_all_or_none"]


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a reused id counts as alive,
    which only delays a sweep). Without POSIX signals nothing is taken as stale."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(folder: Path, glob: str, pattern: re.Pattern[str]) -> list[Path]:
    """Remove the files in ``folder`` matching ``glob`` whose name matches ``pattern`` (its
    first group the writer's pid) and whose writer is gone; return what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(glob):
        match = pattern.fullmatch(path.name)
        if match and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_all_or_none(writers: dict[Path, Callable[[Path], object]],
                      overwrite: bool = True) -> None:
    """Write a set of files (a CSV and its probabilities, say) all or none: each writer
    fills a temporary sibling of its file; only when every one has succeeded are they
    moved into place. On any failure no temporary file is left and no target changed.
    ``overwrite`` False: a target that exists when the files are moved into place (another
    process wrote it meanwhile) is left as it is and ``OutputExistsError`` raised: the
    move is an exclusive create (a hard link), so of two writers racing, one wins."""
    temporaries = {path: _temporary_path(path) for path in writers}
    for path in writers:  # what a writer killed outright (kill -9) left behind
        sweep_stale(path.parent, f".{path.name}.tmp*",
                    re.compile(re.escape(f".{path.name}.tmp") + r"(\d+)"))
    placed: list[Path] = []
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(temporaries[path])
        for path, tmp in temporaries.items():
            _move_into_place(tmp, path, overwrite)
            placed.append(path)
    except BaseException:
        if not overwrite:  # all or none: what this call created goes again
            for path in placed:
                path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def refuse_existing(paths: list[Path], overwrite: bool,
                    elsewhere: str = "choose another --out") -> None:
    """Outputs that exist stay untouched unless the user asked for --overwrite
    (``elsewhere``: the command's other way out)."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]}{more} already exists; pass --overwrite to "
                                f"replace it or {elsewhere}.")


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists, atomically
    except FileExistsError:
        raise OutputExistsError(
            f"{path} was written by another process while this one ran; it is kept and "
            "nothing of this run was written. Pass --overwrite to replace it or choose "
            "another --out.") from None
    except OSError:  # a file system without hard links: the best it allows
        refuse_existing([path], overwrite=False)
        os.replace(tmp, path)


@contextlib.contextmanager
def held_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a folder about to be written) while the block
    runs: another process asking for it waits. The lock is a hidden sibling file,
    ``.<name>.lock``, so the folder itself holds only what is written into it; the kernel
    lets it go when the holder ends, however it ends. Without POSIX locks: no lock."""
    try:
        import fcntl
    except ImportError:  # Windows: one process at a time is the user's to keep
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
