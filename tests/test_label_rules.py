"""The label rules of svhn.labels at their edges: what counts as a digit, labels of exactly
``max_len``, the decoding of several all-blank predictions and of long predictions, and the
fix each error names. Written against the survivors of a mutation-testing run (see README,
Tests): each test fails for a change that alters what a user gets.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from svhn.labels import (
    BLANK,
    LabelFileError,
    canonical_predictions,
    decode_label,
    decode_probabilities,
    encode_label,
    load_labels,
    split_by_length,
)


def entry(label, **overrides) -> dict:
    n = len(label)
    base = {"label": label, "left": [10 * i for i in range(n)], "top": [0] * n,
            "width": [8] * n, "height": [20] * n}
    base.update(overrides)
    return base


def label_file(tmp_path, entries: dict):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("digit", [10, True, False, -1, 1.0, "3", None])
def test_only_the_integers_0_to_9_are_digits(tmp_path, digit):
    # 10 is the blank class, and JSON true would otherwise pass as the digit 1.
    path = label_file(tmp_path, {"a.png": entry([1, digit])})
    with pytest.raises(LabelFileError, match=rf"'a.png': digit {digit!r} is outside 0-9"):
        load_labels(path)


@pytest.mark.parametrize("value", [5, None, "3"])
def test_a_box_field_that_is_not_a_list_is_a_label_error(tmp_path, value):
    path = label_file(tmp_path, {"a.png": entry([1], top=value)})
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
    samples = load_labels(label_file(tmp_path, {"a.png": entry([1, 2, 3]),
                                                "b.png": entry([4])}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, too_long = split_by_length(samples, max_len=3)
    assert [s.file_name for s in kept] == ["a.png", "b.png"] and too_long == []
    assert encode_label([1, 2, 3], max_len=3) == [1, 2, 3]


def test_the_warning_names_ten_left_out_files_and_the_max_len_that_keeps_them(tmp_path):
    entries = {f"long{i:02d}.png": entry([1, 2, 3]) for i in range(11)}
    entries["short.png"] = entry([1])
    samples = load_labels(label_file(tmp_path, entries))
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
