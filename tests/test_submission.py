"""The submission file (svhn.inference.submission): the README's atomic-write promise, and the
format rules a submission is built, written and read by (the format tests were written
against the survivors of a mutation-testing run, see README, Tests).

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

from svhn.inference.submission import (
    SubmissionError,
    build_submission,
    compare_with_sample,
    read_submission,
    write_submission,
)

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


# ------------------------------------------------------------------- building and writing


def test_a_built_submission_has_exactly_the_two_columns_in_file_name_order():
    frame = build_submission(["c.png", "a.png", "b.png"], ["3", "01", "2"])
    assert list(frame.columns) == ["file_name", "file_code"]
    assert frame.index.tolist() == [0, 1, 2]
    assert frame.values.tolist() == [["a.png", "01"], ["b.png", "2"], ["c.png", "3"]]
    with pytest.raises(ValueError, match=r"^3 file names but 2 codes\.$"):
        build_submission(["a.png", "b.png", "c.png"], ["1", "2"])


def test_only_the_two_columns_are_written_even_from_a_wider_frame(tmp_path):
    frame = new_frame().assign(probability=[0.9, 0.8])
    path = write_submission(frame, tmp_path / "sub.csv")
    assert path.read_text() == NEW_CSV


def test_missing_folders_on_the_way_are_created(tmp_path):
    path = write_submission(new_frame(), tmp_path / "a" / "b" / "sub.csv")
    assert path.read_text() == NEW_CSV


# --------------------------------------------------------------------------- reading


def read_error(tmp_path, text: str) -> str:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(SubmissionError) as err:
        read_submission(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


@pytest.mark.parametrize("first_row", ["a.png,1", "b.JPG,1", "c.jpeg,2", "d.jpg,3"])
def test_a_missing_header_is_named_with_the_line_to_add(tmp_path, first_row):
    assert read_error(tmp_path, f"{first_row}\n") == (
        f"first line is '{first_row}'; the header line is missing: add "
        "'file_name,file_code' as the first line.")


def test_a_wrong_header_shows_what_was_found_and_what_is_needed(tmp_path):
    assert read_error(tmp_path, "name,code\na.png,1\n") == (
        "first line is 'name,code'; the header must be exactly 'file_name,file_code' "
        "(those two columns, in order).")


def test_an_empty_file_and_a_ragged_row_say_how_to_fix_them(tmp_path):
    assert read_error(tmp_path, "") == (
        "the file is empty; write the header file_name,file_code and one row per image.")
    ragged = read_error(tmp_path, "file_name,file_code\na.png,1,2\n")
    assert ragged.startswith("not a two-column CSV (")
    assert "Expected 2 fields in line 2, saw 3" in ragged  # the parser's own detail
    assert ragged.endswith("); write exactly file_name,file_code per row.")


def test_duplicates_list_the_first_five_names(tmp_path):
    names = [f"{c}.png" for c in "abcdef"]
    rows = "".join(f"{n},1\n{n},2\n" for n in names)
    assert read_error(tmp_path, "file_name,file_code\n" + rows) == (
        "6 file name(s) appear more than once (first: a.png, b.png, c.png, d.png, e.png); "
        "keep one row per image.")


def test_sample_differences_list_the_first_five_names():
    sample = pd.DataFrame({"file_name": [f"{i}.png" for i in range(8)], "file_code": "0"})
    ours = pd.DataFrame({"file_name": ["0.png", "1.png"] + [f"x{i}.png" for i in range(6)],
                         "file_code": "1"})
    assert compare_with_sample(ours, sample) == [
        "6 file name(s) of the sample are missing (first: 2.png, 3.png, 4.png, 5.png, 6.png)",
        "6 file name(s) are not in the sample (first: x0.png, x1.png, x2.png, x3.png, x4.png)",
    ]
