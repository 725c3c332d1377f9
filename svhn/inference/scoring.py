"""Score a submission CSV against a label file the way the competition does.

``python -m svhn.score --submission submit/x_val.csv --labels data/mchar/mchar_val.json [--json]``

Metrics, all over every labelled image (an image without a valid row counts as wrong):

- ``seq_acc``: the competition score, the share of images whose code equals the whole label.
- ``char_acc``: position-wise character accuracy, ``sum(matches) / sum(max(len(label),
  len(code)))`` where ``matches`` counts positions ``i`` with ``code[i] == label[i]``
  (strings aligned at the left). Extra or missing digits therefore cost, and a missing or
  invalid row scores 0 matches over ``len(label)``.
- ``by_length``: ``seq_acc`` of the images whose label has 1, 2, ... digits.

Rows are checked as the competition would: file names not in the labels are counted as
``extra`` (ignored otherwise), codes that are not a digit string (``1a``, empty) as
``invalid`` (wrong). A missing header, wrong columns or duplicate file names are errors.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from svhn.data.labels import Sample, load_labels
from svhn.errors import SettingError, command
from svhn.inference.submission import is_digit_code, read_submission

__all__ = ["ScoreReport", "char_matches", "format_report", "read_submission", "score_file",
           "score_submission"]

_EXAMPLES = 5  # file names quoted per problem kind


@dataclass
class ScoreReport:
    """Scores of one submission; ``by_length`` maps label length -> seq_acc."""

    seq_acc: float
    char_acc: float
    by_length: dict[int, float]
    count_by_length: dict[int, int]
    n_images: int  # labelled images, the denominator of seq_acc
    n_correct: int
    n_missing: int  # labelled images without a row
    n_extra: int  # rows whose file name is not in the labels
    n_invalid: int  # rows of labelled images whose code is not a digit string
    examples: dict[str, list[str]] = field(default_factory=dict)  # missing/extra/invalid

    def to_dict(self) -> dict:
        """JSON-ready (length keys as strings)."""
        out = asdict(self)
        out["by_length"] = {str(k): v for k, v in self.by_length.items()}
        out["count_by_length"] = {str(k): v for k, v in self.count_by_length.items()}
        return out


def char_matches(label: str, code: str) -> tuple[int, int]:
    """(matching positions, max(len(label), len(code))) with both strings left-aligned."""
    return sum(a == b for a, b in zip(label, code)), max(len(label), len(code))


def score_submission(submission: pd.DataFrame, samples: Sequence[Sample]) -> ScoreReport:
    """Score a submission (``read_submission``'s frame) against labelled samples."""
    if not samples:
        raise SettingError("no labelled images to score against.")
    codes = dict(zip(submission["file_name"], submission["file_code"]))
    labelled = {s.file_name for s in samples}
    missing = [s.file_name for s in samples if s.file_name not in codes]
    extra = sorted(name for name in codes if name not in labelled)
    invalid = [s.file_name for s in samples
               if s.file_name in codes and not is_digit_code(codes[s.file_name])]

    correct_by_length: dict[int, int] = defaultdict(int)
    count_by_length: dict[int, int] = defaultdict(int)
    matched = slots = 0
    for sample in samples:
        label = sample.label
        code = codes.get(sample.file_name, "")
        code = code if is_digit_code(code) else ""  # invalid rows score nothing
        count_by_length[len(label)] += 1
        correct_by_length[len(label)] += code == label
        hits, width = char_matches(label, code)
        matched, slots = matched + hits, slots + width

    n_correct = sum(correct_by_length.values())
    lengths = sorted(count_by_length)
    return ScoreReport(
        seq_acc=n_correct / len(samples),
        char_acc=matched / slots,
        by_length={n: correct_by_length[n] / count_by_length[n] for n in lengths},
        count_by_length={n: count_by_length[n] for n in lengths},
        n_images=len(samples),
        n_correct=n_correct,
        n_missing=len(missing),
        n_extra=len(extra),
        n_invalid=len(invalid),
        examples={"missing": missing[:_EXAMPLES], "extra": extra[:_EXAMPLES],
                  "invalid": [f"{n}={codes[n]!r}" for n in invalid[:_EXAMPLES]]},
    )


def score_file(submission_path: str | Path, labels_path: str | Path) -> ScoreReport:
    """Read both files and score; errors name the file at fault."""
    return score_submission(read_submission(submission_path), load_labels(labels_path))


def format_report(report: ScoreReport) -> str:
    """Human-readable lines: score, character accuracy, per length, row problems."""
    lines = [
        f"score (whole-string accuracy): {report.seq_acc:.4f} "
        f"({report.n_correct}/{report.n_images})",
        f"character accuracy (char_acc: the written strings' digits, position by position; "
        f"not the training's position_acc): {report.char_acc:.4f}",
        "by label length: " + ", ".join(
            f"{n} digit{'s' if n > 1 else ''}: {acc:.4f} (n={report.count_by_length[n]})"
            for n, acc in report.by_length.items()),
    ]
    problems = {
        "missing": (report.n_missing, "labelled image(s) have no row (counted wrong)"),
        "invalid": (report.n_invalid, "row(s) have a code that is not a digit string "
                                      "(counted wrong)"),
        "extra": (report.n_extra, "row(s) name an image that is not in the labels (ignored)"),
    }
    for kind, (count, text) in problems.items():
        if count:
            lines.append(f"{count} {text}; first: {', '.join(report.examples[kind])}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.score",
        description="Score a submission CSV (file_name,file_code) against a label JSON.",
    )
    parser.add_argument("--submission", required=True, type=Path, help="submission CSV")
    parser.add_argument("--labels", required=True, type=Path,
                        help="competition label JSON, e.g. data/mchar/mchar_val.json")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    report = score_file(args.submission, args.labels)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0
