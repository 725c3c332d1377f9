"""Tests for scoring submissions (svhn.score) and the submission file helpers; the report
``python -m svhn.score`` prints and refuses is checked word for word where a user reads it
(written against the survivors of a mutation-testing run, see README, Tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers.layout import write_labels

from svhn.inference.scoring import char_matches, main, read_submission, score_file, score_submission
from svhn.inference.submission import (
    SubmissionError,
    build_submission,
    compare_with_sample,
    write_submission,
)

LABELS = {"a.png": [1, 2, 3], "b.png": [0, 0, 7], "c.png": [5], "d.png": [4, 2]}


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def labels_path(tmp_path: Path) -> Path:
    return write_labels(tmp_path / "labels.json", LABELS)


def score_text(tmp_path: Path, labels_path: Path, text: str):
    return score_file(write_text(tmp_path / "sub.csv", text), labels_path)


# ------------------------------------------------------------------------------ scores


def test_perfect_submission_scores_one_and_keeps_leading_zeros(tmp_path, labels_path):
    report = score_text(tmp_path, labels_path,
                        "file_name,file_code\na.png,123\nb.png,007\nc.png,5\nd.png,42\n")
    assert report.seq_acc == 1.0 and report.char_acc == 1.0
    assert (report.n_missing, report.n_extra, report.n_invalid) == (0, 0, 0)
    assert report.by_length == {1: 1.0, 2: 1.0, 3: 1.0}
    assert report.count_by_length == {1: 1, 2: 1, 3: 2}


def test_read_submission_keeps_codes_as_strings(tmp_path):
    frame = read_submission(write_text(tmp_path / "s.csv", "file_name,file_code\nb.png,007\n"))
    assert frame["file_code"].tolist() == ["007"]


@pytest.mark.parametrize(("label", "code", "expected"), [
    ("123", "123", (3, 3)),
    ("123", "12", (2, 3)),  # a missing digit costs its slot
    ("123", "1234", (3, 4)),  # an extra digit costs too
    ("123", "321", (1, 3)),  # left-aligned positions: only the middle matches
    ("12", "", (0, 2)),
])
def test_char_matches_is_position_wise_over_the_longer_string(label, code, expected):
    assert char_matches(label, code) == expected


def test_char_acc_sums_matches_over_slots(tmp_path, labels_path):
    report = score_text(tmp_path, labels_path,
                        "file_name,file_code\na.png,12\nb.png,007\nc.png,5\nd.png,43\n")
    assert report.seq_acc == pytest.approx(2 / 4)
    assert report.char_acc == pytest.approx((2 + 3 + 1 + 1) / (3 + 3 + 1 + 2))
    assert report.by_length == {1: 1.0, 2: 0.0, 3: 0.5}


def test_missing_rows_count_as_wrong(tmp_path, labels_path):
    report = score_text(tmp_path, labels_path, "file_name,file_code\na.png,123\nc.png,5\n")
    assert report.n_images == 4 and report.n_missing == 2
    assert report.seq_acc == pytest.approx(2 / 4)
    assert report.examples["missing"] == ["b.png", "d.png"]


def test_unknown_file_names_are_counted_as_extra(tmp_path, labels_path):
    report = score_text(tmp_path, labels_path, "file_name,file_code\na.png,123\nb.png,007\n"
                                               "c.png,5\nd.png,42\nzzz.png,1\n")
    assert report.seq_acc == 1.0
    assert report.n_extra == 1 and report.examples["extra"] == ["zzz.png"]


@pytest.mark.parametrize("bad_code", ["1a", "", " 42", "4.2", "nan", "NaN", "-42"])
def test_non_digit_codes_count_as_wrong(tmp_path, labels_path, bad_code):
    report = score_text(tmp_path, labels_path, "file_name,file_code\na.png,123\nb.png,007\n"
                                               f"c.png,5\nd.png,{bad_code}\n")
    assert report.n_invalid == 1
    assert report.seq_acc == pytest.approx(3 / 4)
    assert report.char_acc == pytest.approx(7 / 9)  # d.png scores 0 of its 2 slots


def test_row_without_code_field_counts_as_invalid(tmp_path, labels_path):
    report = score_text(tmp_path, labels_path, "file_name,file_code\na.png,123\nd.png\n")
    assert report.n_invalid == 1 and report.n_missing == 2 and report.n_correct == 1


# ---------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(("text", "message"), [
    ("a.png,123\nb.png,007\n", "header line is missing"),
    ("name,code\na.png,123\n", "header must be exactly"),
    ("file_code,file_name\n123,a.png\n", "header must be exactly"),
    ("file_name,file_code,extra\na.png,123,x\n", "header must be exactly"),
    ("file_name,file_code\na.png,123,9\n", "not a two-column CSV"),
    ("file_name,file_code\na.png,123\na.png,12\n", "more than once"),
    ("", "empty"),
])
def test_malformed_submissions_are_clear_errors(tmp_path, text, message):
    path = write_text(tmp_path / "bad.csv", text)
    with pytest.raises(SubmissionError, match=message) as err:
        read_submission(path)
    assert str(path) in str(err.value)


def test_missing_submission_file_is_an_error(tmp_path):
    with pytest.raises(SubmissionError, match="not found"):
        read_submission(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- command line


def test_cli_prints_report(tmp_path, labels_path, capsys):
    sub = write_text(tmp_path / "s.csv", "file_name,file_code\na.png,123\nb.png,7\nx.png,1\n")
    assert main(["--submission", str(sub), "--labels", str(labels_path)]) == 0
    out = capsys.readouterr().out
    assert "score (whole-string accuracy): 0.2500 (1/4)" in out
    assert "2 labelled image(s) have no row" in out
    assert "1 row(s) name an image that is not in the labels" in out


def test_cli_json_is_one_object(tmp_path, labels_path, capsys):
    sub = write_text(tmp_path / "s.csv", "file_name,file_code\na.png,123\nb.png,1a\n")
    assert main(["--submission", str(sub), "--labels", str(labels_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_acc"] == 0.25 and report["n_invalid"] == 1 and report["n_missing"] == 2
    assert report["by_length"] == {"1": 0.0, "2": 0.0, "3": 0.5}


def test_cli_error_names_the_file(tmp_path, labels_path, capsys):
    sub = write_text(tmp_path / "dup.csv", "file_name,file_code\na.png,1\na.png,2\n")
    assert main(["--submission", str(sub), "--labels", str(labels_path)]) == 2
    assert str(sub) in capsys.readouterr().err


# ------------------------------------------------------------------ submission helpers


def test_build_and_write_submission_round_trip(tmp_path):
    frame = build_submission(["b.png", "a.png"], ["007", "12"])
    path = write_submission(frame, tmp_path / "new" / "sub.csv")
    assert path.read_text() == "file_name,file_code\na.png,12\nb.png,007\n"
    assert not [p for p in path.parent.iterdir() if p.name != "sub.csv"]  # no temp left


def test_score_submission_accepts_a_built_frame(tmp_path, labels_path):
    from svhn.data.labels import load_labels

    frame = build_submission(list(LABELS), ["123", "007", "5", "42"])
    assert score_submission(frame, load_labels(labels_path)).seq_acc == 1.0


def test_compare_with_sample_reports_missing_extra_and_order():
    sample = pd.DataFrame({"file_name": ["a.png", "b.png", "c.png"], "file_code": "0"})

    def names(*file_names: str) -> pd.DataFrame:
        return pd.DataFrame({"file_name": list(file_names), "file_code": "1"})

    assert compare_with_sample(names("a.png", "b.png", "c.png"), sample) == []
    problems = compare_with_sample(names("a.png", "b.png", "z.png"), sample)
    assert any("missing" in p and "c.png" in p for p in problems)
    assert any("not in the sample" in p and "z.png" in p for p in problems)
    (order,) = compare_with_sample(names("b.png", "a.png", "c.png"), sample)
    assert "different order" in order and "row 1" in order


# ------------------------------------------------------------- the report, word for word

REPORT_LABELS = {"a.png": [1, 2, 3], "b.png": [0, 0, 7], "c.png": [5], "d.png": [4, 2],
                 "e.png": [9], "f.png": [3, 1]}


@pytest.fixture
def report_files(tmp_path):
    """(submission, labels): a submission with a problem of every kind."""
    labels = write_labels(tmp_path / "labels.json", REPORT_LABELS)
    submission = tmp_path / "sub.csv"
    # right, one digit short, right, invalid, (e.png and f.png missing), not in the labels
    submission.write_text("file_name,file_code\na.png,123\nb.png,07\nc.png,5\nd.png,4a\n"
                          "z.png,1\n")
    return submission, labels


def test_the_report_a_user_reads(report_files, capsys):
    submission, labels = report_files
    assert main(["--submission", str(submission), "--labels", str(labels)]) == 0
    assert capsys.readouterr().out == (
        "score (whole-string accuracy): 0.3333 (2/6)\n"
        "character accuracy (char_acc: the written strings' digits, position by position; "
        "not the training's position_acc): 0.4167\n"
        "by label length: 1 digit: 0.5000 (n=2), 2 digits: 0.0000 (n=2), "
        "3 digits: 0.5000 (n=2)\n"
        "2 labelled image(s) have no row (counted wrong); first: e.png, f.png\n"
        "1 row(s) have a code that is not a digit string (counted wrong); first: d.png='4a'\n"
        "1 row(s) name an image that is not in the labels (ignored); first: z.png\n")


def test_json_report_lists_the_problem_rows(report_files, capsys):
    submission, labels = report_files
    assert main(["--submission", str(submission), "--labels", str(labels), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "seq_acc": 2 / 6, "char_acc": 5 / 12,
        "by_length": {"1": 0.5, "2": 0.0, "3": 0.5}, "count_by_length": {"1": 2, "2": 2, "3": 2},
        "n_images": 6, "n_correct": 2, "n_missing": 2, "n_extra": 1, "n_invalid": 1,
        "examples": {"missing": ["e.png", "f.png"], "extra": ["z.png"],
                     "invalid": ["d.png='4a'"]},
    }


@pytest.mark.parametrize("missing", ["--submission", "--labels"])
def test_both_files_are_required(report_files, missing, capsys):
    submission, labels = report_files
    argv = {"--submission": str(submission), "--labels": str(labels)}
    del argv[missing]
    with pytest.raises(SystemExit) as done:
        main([arg for pair in argv.items() for arg in pair])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m svhn.score ")
    assert f"the following arguments are required: {missing}" in err


def test_scoring_against_no_labels_is_an_error():
    with pytest.raises(ValueError, match=r"^no labelled images to score against\.$"):
        score_submission(build_submission(["a.png"], ["1"]), [])
