"""Temporary files named after the process that writes them, and the sweep of those a
killed process left behind: the one rule for the image cache and the submission files.

A file being written is a sibling of its final path (so ``os.replace`` is atomic) whose
name carries the writer's process id; a process killed outright (``kill -9``) cannot clean
up, so the next writer of the same file removes temporaries whose process no longer runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["process_alive", "sweep_stale"]


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
