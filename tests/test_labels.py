import json

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


def write_json(path, entries):
    path.write_text(json.dumps(entries))
    return path


def entry(label, **overrides):
    n = len(label)
    base = {"label": label, "left": [10.0 * i for i in range(n)], "top": [5] * n,
            "width": [8] * n, "height": [20.5] * n}
    base.update(overrides)
    return base


def test_load_labels_reads_competition_format(tmp_path):
    path = write_json(tmp_path / "l.json", {"000001.png": entry([2, 3]),
                                            "000000.png": entry([1, 9])})
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
    path = write_json(tmp_path / "l.json", {"a.png": entry([1]),
                                            "b.png": entry([1, 2, 3, 4, 5, 6])})
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
