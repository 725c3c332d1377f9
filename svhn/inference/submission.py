"""The competition's submission file: reading, building, writing and checking it.

A submission is a CSV with the header ``file_name,file_code`` and one row per test image,
``file_code`` being the digit string read from the image (``"007"`` stays ``"007"``).
Shared by ``svhn.predict`` (which writes one) and ``svhn.score`` (which reads one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from svhn.errors import SettingError, SvhnError
from svhn.tempfiles import write_all_or_none

__all__ = ["build_submission", "check_writable", "COLUMNS", "compare_with_sample",
           "is_digit_code", "OutputError", "read_submission", "SAMPLE_SUBMISSION",
           "submission_writer", "SubmissionError", "write_submission"]

COLUMNS = ("file_name", "file_code")
SAMPLE_SUBMISSION = "mchar_sample_submit_A.csv"
_DIGITS = re.compile(r"[0-9]+")


class OutputError(SvhnError, ValueError):
    """An output file that cannot be written where it was asked for."""


class SubmissionError(SvhnError, ValueError):
    """A submission file that cannot be read as the competition's format."""


def is_digit_code(code: object) -> bool:
    """True for a non-empty string of ASCII digits (what the competition can score)."""
    return isinstance(code, str) and _DIGITS.fullmatch(code) is not None


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission CSV with every cell as a string (empty cells become ``""``).

    Raises SubmissionError naming the file and the fix for an unreadable file, a missing
    header, wrong columns or duplicate file names. Odd codes (``1a``, empty) are kept for
    the scorer to count as wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file not found.")
    try:
        # header=None: the header is checked by hand, so pandas never guesses an index
        # column from a row with an extra field (it raises on that row instead).
        rows = pd.read_csv(path, header=None, dtype=str, keep_default_na=False,
                           na_filter=False)
    except pd.errors.EmptyDataError:
        raise SubmissionError(
            f"{path}: the file is empty; write the header {','.join(COLUMNS)} and one row "
            "per image."
        ) from None
    except pd.errors.ParserError as err:
        raise SubmissionError(
            f"{path}: not a two-column CSV ({str(err).strip()}); write exactly "
            f"{','.join(COLUMNS)} per row."
        ) from None
    _check_header(path, [str(c) for c in rows.iloc[0]])
    frame = rows.iloc[1:].reset_index(drop=True).set_axis(list(COLUMNS), axis=1)
    frame = frame.fillna("")  # a row with a missing last field parses as NaN
    _check_unique_names(path, frame)
    return frame


def _check_header(path: Path, found: list[str]) -> None:
    if tuple(found) == COLUMNS:
        return
    header = ",".join(found)
    if any(name.lower().endswith((".png", ".jpg", ".jpeg")) for name in found):
        fix = f"the header line is missing: add '{','.join(COLUMNS)}' as the first line."
    else:
        fix = f"the header must be exactly '{','.join(COLUMNS)}' (those two columns, in order)."
    raise SubmissionError(f"{path}: first line is '{header}'; {fix}")


def _check_unique_names(path: Path, frame: pd.DataFrame) -> None:
    duplicated = frame["file_name"][frame["file_name"].duplicated()].unique()
    if len(duplicated):
        raise SubmissionError(
            f"{path}: {len(duplicated)} file name(s) appear more than once (first: "
            f"{', '.join(map(str, duplicated[:5]))}); keep one row per image."
        )


def build_submission(file_names: Sequence[str], codes: Sequence[str]) -> pd.DataFrame:
    """Rows sorted by file name, the order of the competition's sample submission."""
    if len(file_names) != len(codes):
        raise SettingError(f"{len(file_names)} file names but {len(codes)} codes.")
    frame = pd.DataFrame({"file_name": list(file_names), "file_code": list(codes)},
                         columns=list(COLUMNS))
    return frame.sort_values("file_name", kind="stable").reset_index(drop=True)


def write_submission(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the CSV atomically: readers see the old file or the whole new one, never half."""
    path = Path(path)
    write_all_or_none({path: submission_writer(frame)})
    return path


def submission_writer(frame: pd.DataFrame) -> Callable[[Path], object]:
    """Writes the submission's CSV to the path it is given (see ``write_all_or_none``)."""
    return lambda target: frame.to_csv(target, index=False, columns=list(COLUMNS))


def check_writable(paths: Sequence[Path]) -> None:
    """Fail before any work when an output cannot be written (a folder in the way, a
    read-only folder), naming the path."""
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{path} is a folder; give a file name with --out.")
        folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
        if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: cannot write there ({folder} is not a writable "
                              "folder); choose another --out.")


def compare_with_sample(frame: pd.DataFrame, sample: pd.DataFrame) -> list[str]:
    """Differences in file names and order against the sample submission (empty = same)."""
    names = frame["file_name"].tolist()
    expected = sample["file_name"].tolist()
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} file name(s) of the sample are missing "
                        f"(first: {', '.join(missing[:5])})")
    if extra:
        problems.append(f"{len(extra)} file name(s) are not in the sample "
                        f"(first: {', '.join(extra[:5])})")
    if not missing and not extra and names != expected:
        first = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
        problems.append(f"same file names in a different order (first difference at row "
                        f"{first + 1}: {names[first]} where the sample has {expected[first]})")
    return problems
