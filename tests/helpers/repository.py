"""The repository under test and a snapshot of its files, for the guard in conftest.py: the
tests must not write into the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOT_WATCHED = {".git", ".venv", "venv", ".pytest_cache", ".ruff_cache", "__pycache__",
               ".ipynb_checkpoints"}


def repository_state(root: Path = REPO) -> dict[str, int]:
    """Every file and folder under the repository (tool caches aside) -> modification time."""
    state = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_WATCHED and not d.endswith(".egg-info")]
        here = Path(folder).relative_to(root)
        state.update({f"{here / d}/": 0 for d in dirs})
        state.update({str(here / f): Path(folder, f).stat().st_mtime_ns for f in files})
    return state


def changes(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """``+ path`` added, ``- path`` removed, ``~ path`` modified between two snapshots."""
    return sorted([f"+ {p}" for p in after.keys() - before.keys()]
                  + [f"- {p}" for p in before.keys() - after.keys()]
                  + [f"~ {p}" for p in before.keys() & after.keys() if before[p] != after[p]])
