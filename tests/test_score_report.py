"""What ``python -m svhn.score`` prints and refuses, word for word where a user reads it.
Written against the survivors of a mutation-testing run (see README, Tests)."""

from __future__ import annotations

import json

import pytest

from svhn.score import main, score_submission
from svhn.submission import build_submission

LABELS = {"a.png": [1, 2, 3], "b.png": [0, 0, 7], "c.png": [5], "d.png": [4, 2], "e.png": [9],
          "f.png": [3, 1]}


@pytest.fixture
def files(tmp_path):
    entries = {name: {"label": digits, "left": [0] * len(digits), "top": [0] * len(digits),
                      "width": [1] * len(digits), "height": [1] * len(digits)}
               for name, digits in LABELS.items()}
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(entries))
    submission = tmp_path / "sub.csv"
    # right, one digit short, right, invalid, (e.png and f.png missing), not in the labels
    submission.write_text("file_name,file_code\na.png,123\nb.png,07\nc.png,5\nd.png,4a\n"
                          "z.png,1\n")
    return submission, labels


def test_the_report_a_user_reads(files, capsys):
    submission, labels = files
    assert main(["--submission", str(submission), "--labels", str(labels)]) == 0
    assert capsys.readouterr().out == (
        "score (whole-string accuracy): 0.3333 (2/6)\n"
        "character accuracy (position-wise): 0.4167\n"
        "by label length: 1 digit: 0.5000 (n=2), 2 digits: 0.0000 (n=2), "
        "3 digits: 0.5000 (n=2)\n"
        "2 labelled image(s) have no row (counted wrong); first: e.png, f.png\n"
        "1 row(s) have a code that is not a digit string (counted wrong); first: d.png='4a'\n"
        "1 row(s) name an image that is not in the labels (ignored); first: z.png\n")


def test_json_report_lists_the_problem_rows(files, capsys):
    submission, labels = files
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
def test_both_files_are_required(files, missing, capsys):
    submission, labels = files
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
