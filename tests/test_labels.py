"""The label rules of svhn.data.labels: the competition's label files, encoding labels as
fixed-length targets and decoding predictions, at their edges too (what counts as a digit,
labels of exactly ``max_len``, several all-blank predictions, long predictions) and the fix
each error names. The edge cases were written against the survivors of a mutation-testing
run (see README, Tests): each fails for a change that alters what a user gets.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers.layout import entry, write_labels

from svhn.data.labels import (
    BLANK,
    LabelFileError,
    canonical_predictions,
    decode_label,
    decode_probabilities,
    encode_label,
    load_labels,
    split_by_length,
)


def test_load_labels_reads_competition_format(tmp_path):
    boxes = {"at": (0.0, 5), "size": (8, 20.5), "step": 10.0}  # digit k: left 10 k, top 5
    path = write_labels(tmp_path / "l.json", {"000001.png": entry([2, 3], **boxes),
                                              "000000.png": entry([1, 9], **boxes)})
    samples = load_labels(path)
    assert [s.file_name for s in samples] == ["000000.png", "000001.png"]
    assert samples[0].digits == (1, 9) and samples[0].label == "19"
    assert samples[0].boxes[1] == (10.0, 5.0, 8.0, 20.5)
    assert samples[0].union_box() == (0.0, 5.0, 18.0, 25.5)


def test_encode_pads_with_blank_and_never_truncates():
    assert encode_label([1, 9]) == [1, 9, BLANK, BLANK, BLANK]
    assert encode_label([1, 2, 3, 4, 5, 6], max_len=6) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="max_len"):
        encode_label([1, 2, 3, 4, 5, 6], max_len=5)


def test_decode_drops_blanks_wherever_they_stand():
    assert decode_label([1, 9, BLANK, BLANK, BLANK]) == "19"
    # A blank between digits is dropped too: the competition scores strings, not slots.
    assert decode_label([1, BLANK, 2, BLANK, BLANK]) == "12"
    assert decode_label([BLANK] * 5) == ""


def one_hot_probs(rows):
    probs = torch.full((len(rows), len(rows[0]), 11), 0.01)
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            probs[i, j, c] = 0.9
    return probs


def test_canonical_predictions_left_align_and_fill_empty():
    probs = one_hot_probs([[BLANK, 4, BLANK, 2, BLANK], [BLANK] * 5])
    probs[1, 3, 7] = 0.5  # the most likely digit of an all-blank prediction
    aligned = canonical_predictions(probs)
    assert aligned.tolist() == [[4, 2, BLANK, BLANK, BLANK], [7, BLANK, BLANK, BLANK, BLANK]]
    assert decode_probabilities(probs) == ["42", "7"]


def test_split_by_length_warns_with_count_and_names(tmp_path):
    path = write_labels(tmp_path / "l.json", {"a.png": [1], "b.png": [1, 2, 3, 4, 5, 6]})
    with pytest.warns(UserWarning, match=r"left out 1 image.*b\.png.*max_len=6"):
        kept, too_long = split_by_length(load_labels(path), max_len=5)
    assert [s.file_name for s in kept] == ["a.png"]
    assert [s.file_name for s in too_long] == ["b.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a.png": {"label": [1]', r"l\.json:1:\d+: not valid JSON"),
        ('["a.png"]', "expected an object"),
        (json.dumps({"a.png": entry([1, 2], left=[1])}), "'left' has 1 values for 2 digits"),
        (json.dumps({"a.png": entry([1, 12])}), "digit 12 is outside 0-9"),
        (json.dumps({"a.png": entry([])}), "empty or missing label"),
        (json.dumps({"a.png": {"left": [1]}}), "with a 'label' list"),
    ],
)
def test_bad_label_files_name_the_file_and_problem(tmp_path, content, message):
    path = tmp_path / "l.json"
    path.write_text(content)
    with pytest.raises(LabelFileError, match=message) as err:
        load_labels(path)
    assert str(path) in str(err.value)


def test_missing_label_file_is_a_clear_error(tmp_path):
    with pytest.raises(LabelFileError, match="label file not found"):
        load_labels(tmp_path / "nope.json")


# -- at the edges --------------------------------------------------------------------------
WHOLE_NUMBERS = "; the competition writes digits as whole numbers 0-9 (e.g. [1, 9])."
NOT_DIGITS = [(10, " is outside 0-9. The original SVHN files write 0 as 10: map 10 to 0 in "
                   "the label file before use (this project reads the competition's labels, "
                   "where 0 is 0)."),
              (-1, " is outside 0-9; fix the entry."),
              (True, " is a bool" + WHOLE_NUMBERS), (False, " is a bool" + WHOLE_NUMBERS),
              (1.0, " is a float" + WHOLE_NUMBERS), ("3", " is a string" + WHOLE_NUMBERS),
              (None, " is a NoneType" + WHOLE_NUMBERS)]


@pytest.mark.parametrize("digit, problem", NOT_DIGITS, ids=[repr(d) for d, _ in NOT_DIGITS])
def test_only_the_integers_0_to_9_are_digits(tmp_path, digit, problem):
    # 10 is the blank class, and JSON true would otherwise pass as the digit 1.
    path = write_labels(tmp_path / "labels.json", {"a.png": entry([1, digit])})
    with pytest.raises(LabelFileError) as error:
        load_labels(path)
    assert str(error.value).endswith(f"'a.png': digit {digit!r}{problem}")


@pytest.mark.parametrize("value", [5, None, "3"])
def test_a_box_field_that_is_not_a_list_is_a_label_error(tmp_path, value):
    path = write_labels(tmp_path / "labels.json", {"a.png": entry([1], top=value)})
    with pytest.raises(LabelFileError, match=rf"'top' has {value} values for 1 digits; "
                                             r"each digit needs one box\."):
        load_labels(path)


def test_label_errors_name_the_fix(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('{"a.png": {"label": [1], ')
    with pytest.raises(LabelFileError, match=r"Re-download the label file; it may be "
                                             r"truncated\.$"):
        load_labels(path)
    with pytest.raises(ValueError, match=r"^label '123456' has 6 digits > max_len=5; raise "
                                         r"max_len to keep it\.$"):
        encode_label([1, 2, 3, 4, 5, 6], max_len=5)


def test_a_label_of_exactly_max_len_is_kept_without_a_warning(tmp_path):
    samples = load_labels(write_labels(tmp_path / "labels.json",
                                       {"a.png": [1, 2, 3], "b.png": [4]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, too_long = split_by_length(samples, max_len=3)
    assert [s.file_name for s in kept] == ["a.png", "b.png"] and too_long == []
    assert encode_label([1, 2, 3], max_len=3) == [1, 2, 3]


def test_the_warning_names_ten_left_out_files_and_the_max_len_that_keeps_them(tmp_path):
    labels = {f"long{i:02d}.png": [1, 2, 3] for i in range(11)}
    labels["short.png"] = [1]
    samples = load_labels(write_labels(tmp_path / "labels.json", labels))
    with pytest.warns(UserWarning) as caught:
        kept, too_long = split_by_length(samples, max_len=2)
    names = ", ".join(f"long{i:02d}.png" for i in range(10))
    assert str(caught[0].message) == (
        f"labels: left out 11 image(s) whose label is longer than max_len=2 ({names}); "
        "set max_len=3 to keep them.")
    assert [s.file_name for s in kept] == ["short.png"] and len(too_long) == 11


def test_each_all_blank_prediction_becomes_its_own_most_likely_digit():
    probs = torch.full((3, 4, 11), 0.01)
    probs[:, :, BLANK] = 0.9
    probs[0, 2, 7] = 0.5
    probs[1, 1, 3] = 0.95  # a digit wins at one position: a normal prediction
    probs[2, 3, 4] = 0.6
    assert decode_probabilities(probs) == ["7", "3", "4"]


def test_long_predictions_keep_their_digit_order():
    # Moving digits left must keep their order at any max_len (a stable sort).
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 24, 11, generator=generator)
    probs[..., BLANK] += torch.rand(64, 24, generator=generator) > 0.5  # many blanks
    classes = probs.argmax(dim=-1).tolist()
    expected = [decode_label(row) for row in classes]
    assert all(expected)  # no all-blank rows here
    assert decode_probabilities(probs) == expected
    aligned = canonical_predictions(probs).tolist()
    assert all(row[len(code):] == [BLANK] * (24 - len(code))
               for row, code in zip(aligned, expected))
