"""The submission file (svhn.submission): the README's atomic-write promise, and the
format rules a submission is built and read by.

"Written atomically" means: the new CSV is written completely to a temporary file in the
target's own folder (so the final rename is atomic on every file system), renamed over the
target in one step, and on any failure the target keeps its old content and no temporary
file is left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from svhn.submission import build_submission, write_submission

OLD = "file_name,file_code\nold.png,1\n"
NEW_CSV = "file_name,file_code\na.png,12\nb.png,007\n"


def new_frame() -> pd.DataFrame:
    return build_submission(["b.png", "a.png"], ["007", "12"])


@pytest.fixture
def target(tmp_path: Path) -> Path:
    folder = tmp_path / "submit"
    folder.mkdir()
    path = folder / "sub.csv"
    path.write_text(OLD)
    return path


def test_the_target_is_replaced_in_one_step_by_a_complete_sibling_file(target, monkeypatch):
    # Planted bugs caught: writing straight to the target; a temporary file outside the
    # target's folder (os.replace is only atomic within one file system).
    real_replace, seen = os.replace, []

    def recording_replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        seen.append({"src": src, "dst": dst, "src_text": src.read_text(),
                     "dst_text": dst.read_text() if dst.exists() else None})
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording_replace)
    assert write_submission(new_frame(), target) == target
    (call,) = [c for c in seen if c["dst"] == target]
    assert call["src"] != target
    assert call["src"].parent.resolve() == target.parent.resolve()
    assert call["src_text"] == NEW_CSV  # complete before the swap
    assert call["dst_text"] == OLD  # the target untouched until the swap
    assert target.read_text() == NEW_CSV
    assert sorted(p.name for p in target.parent.iterdir()) == ["sub.csv"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(
        target, monkeypatch):
    # Planted bugs caught: writing straight to the target (it would hold half a file);
    # no clean-up of the temporary file on failure.
    def half_then_fail(self, path_or_buf=None, *args, **kwargs):
        Path(path_or_buf).write_text(NEW_CSV[:25])  # part of the rows, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_submission(new_frame(), target)
    assert target.read_text() == OLD
    assert sorted(p.name for p in target.parent.iterdir()) == ["sub.csv"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(target, monkeypatch):
    def failing_replace(src, dst, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        write_submission(new_frame(), target)
    assert target.read_text() == OLD
    assert sorted(p.name for p in target.parent.iterdir()) == ["sub.csv"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(self, path_or_buf=None, *args, **kwargs):
        Path(path_or_buf).write_text("file_name,fi")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    folder = tmp_path / "new_folder"
    with pytest.raises(OSError):
        write_submission(new_frame(), folder / "sub.csv")
    assert list(folder.iterdir()) == []
