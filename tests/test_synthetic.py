"""Tests for the synthetic dataset generator (svhn.synthetic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svhn.data import synthetic
from svhn.data.synthetic import generate_dataset, render_number, sample_digits

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_KEYS = {"label", "left", "top", "width", "height"}
MAX_DIGITS = 4
COUNTS = {"mchar_train": 24, "mchar_val": 6, "mchar_test_a": 5}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_dataset(out, n_train=24, n_val=6, n_test=5, seed=3, max_digits=MAX_DIGITS)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def labelled_splits(root: Path) -> dict[str, dict]:
    """Split folder name -> its annotations (test labels come from the synthetic-only file)."""
    return {
        "mchar_train": read_json(root / "mchar_train.json"),
        "mchar_val": read_json(root / "mchar_val.json"),
        "mchar_test_a": read_json(root / "mchar_test_a_labels.json"),
    }


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- layout and format


def test_layout_matches_competition(dataset: Path) -> None:
    for split, count in COUNTS.items():
        names = sorted(p.name for p in (dataset / split).iterdir())
        assert names == [f"{i:06d}.png" for i in range(count)]
    assert (dataset / "mchar_sample_submit_A.csv").is_file()
    assert not (dataset / "mchar_test_a.json").exists()  # the real test split has no labels
    assert not list(dataset.glob("*.tmp"))


def test_json_keys_match_images(dataset: Path) -> None:
    for split, entries in labelled_splits(dataset).items():
        assert sorted(entries) == sorted(p.name for p in (dataset / split).iterdir())


def test_entries_have_competition_format(dataset: Path) -> None:
    for entries in labelled_splits(dataset).values():
        for entry in entries.values():
            assert set(entry) == ENTRY_KEYS
            n = len(entry["label"])
            assert 1 <= n <= MAX_DIGITS
            for key in ENTRY_KEYS:
                assert len(entry[key]) == n
                assert all(type(v) is int for v in entry[key])
            assert all(0 <= d <= 9 for d in entry["label"])


def test_images_are_rgb_png_of_varied_size(dataset: Path) -> None:
    sizes = set()
    for path in (dataset / "mchar_train").iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) > len(COUNTS) // 2


def test_boxes_inside_image_and_left_to_right(dataset: Path) -> None:
    for split, entries in labelled_splits(dataset).items():
        for name, entry in entries.items():
            with Image.open(dataset / split / name) as image:
                width, height = image.size
            boxes = list(zip(entry["left"], entry["top"], entry["width"], entry["height"]))
            for left, top, w, h in boxes:
                assert w >= 1 and h >= 1
                assert left >= 0 and left + w <= width
                assert top >= 0 and top + h <= height
            lefts = [b[0] for b in boxes]
            assert lefts == sorted(set(lefts)), f"{split}/{name}: boxes not left to right"


def test_digits_cover_only_part_of_most_images(dataset: Path) -> None:
    shares = []
    for name, entry in read_json(dataset / "mchar_train.json").items():
        with Image.open(dataset / "mchar_train" / name) as image:
            width = image.width
        right = max(x + w for x, w in zip(entry["left"], entry["width"]))
        shares.append((right - min(entry["left"])) / width)
    assert 0.25 < float(np.median(shares)) < 0.9


def test_sample_submission_lists_test_images(dataset: Path) -> None:
    lines = (dataset / "mchar_sample_submit_A.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "file_name,file_code"
    test_images = sorted(p.name for p in (dataset / "mchar_test_a").iterdir())
    assert lines[1:] == [f"{name},0" for name in test_images]


def test_marker_names_test_labels_as_synthetic_only(dataset: Path) -> None:
    text = (dataset / synthetic.MARKER_NAME).read_text(encoding="utf-8")
    assert "mchar_test_a_labels.json" in text and "synthetic" in text.lower()


# --------------------------------------------------------------------------- box truth


def _gradient(gray: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(gray, axis=1))[:-1] + np.abs(np.diff(gray, axis=0))[:, :-1]


def test_boxes_enclose_the_drawn_digits() -> None:
    """Edges concentrate inside the boxes: more than elsewhere and than in a ring around them.

    Random or loose boxes fail the first or the second comparison.
    """
    beats_outside, beats_ring = [], []
    for i in range(30):
        rng = np.random.default_rng([11, i])
        image, boxes = render_number(sample_digits(rng), rng)
        gray = np.asarray(image.convert("L"), dtype=np.float32)
        inside = np.zeros(gray.shape, bool)
        grown = np.zeros(gray.shape, bool)
        for left, top, w, h in boxes:
            inside[top : top + h, left : left + w] = True
            dx, dy = max(1, w // 3), max(1, h // 3)
            grown[max(0, top - dy) : top + h + dy, max(0, left - dx) : left + w + dx] = True
        edges = _gradient(gray)
        inside, grown = inside[:-1, :-1], grown[:-1, :-1]
        ring = grown & ~inside
        beats_outside.append(edges[inside].mean() > edges[~inside].mean())
        if ring.any():
            beats_ring.append(edges[inside].mean() > edges[ring].mean())
    assert np.mean(beats_outside) >= 0.9
    assert np.mean(beats_ring) >= 0.8


def test_render_number_returns_one_box_per_digit() -> None:
    rng = np.random.default_rng(0)
    image, boxes = render_number([4, 0, 2], rng)
    assert image.mode == "RGB" and len(boxes) == 3
    assert all(len(box) == 4 for box in boxes)


def test_render_number_rejects_bad_digits() -> None:
    with pytest.raises(ValueError, match="0-9"):
        render_number([1, 12], np.random.default_rng(0))
    with pytest.raises(ValueError):
        render_number([], np.random.default_rng(0))


def test_label_lengths_follow_real_distribution() -> None:
    rng = np.random.default_rng(0)
    lengths = Counter(len(sample_digits(rng, 5)) for _ in range(2000))
    assert set(lengths) <= {1, 2, 3, 4, 5}
    assert lengths[2] > lengths[3] > lengths[1] > lengths[4]
    assert 0.48 < lengths[2] / 2000 < 0.60
    assert all(len(sample_digits(rng, 1)) == 1 for _ in range(20))


# --------------------------------------------------------------------------- determinism


def small_dataset(out: Path, seed: int, n_train: int = 3, **kwargs) -> Path:
    return generate_dataset(out, n_train=n_train, n_val=1, n_test=1, seed=seed, **kwargs)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = all_files(small_dataset(tmp_path / "a", seed=5))
    second = all_files(small_dataset(tmp_path / "b", seed=5))
    assert first == second


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    first = all_files(small_dataset(tmp_path / "a", seed=5))
    second = all_files(small_dataset(tmp_path / "b", seed=6))
    assert first["mchar_train.json"] != second["mchar_train.json"]
    assert first["mchar_train/000000.png"] != second["mchar_train/000000.png"]


def test_images_do_not_depend_on_dataset_size(tmp_path: Path) -> None:
    small = small_dataset(tmp_path / "a", seed=2, n_train=2)
    large = small_dataset(tmp_path / "b", seed=2, n_train=4)
    for name in ("000000.png", "000001.png"):
        assert (small / "mchar_train" / name).read_bytes() == (
            large / "mchar_train" / name
        ).read_bytes()
    assert (small / "mchar_test_a" / "000000.png").read_bytes() == (
        large / "mchar_test_a" / "000000.png"
    ).read_bytes()


# --------------------------------------------------------------------------- output folder


def test_val_and_test_default_to_a_quarter(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "d", n_train=8)
    assert len(list((out / "mchar_val").iterdir())) == 2
    assert len(list((out / "mchar_test_a").iterdir())) == 2


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        small_dataset(tmp_path, seed=0)
    assert not (tmp_path / "mchar_train").exists()


def test_overwrite_keeps_unrelated_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    small_dataset(tmp_path, seed=0, overwrite=True)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (tmp_path / "mchar_train.json").is_file()


def test_regenerating_replaces_previous_synthetic_data(tmp_path: Path) -> None:
    small_dataset(tmp_path, seed=0, n_train=4)
    small_dataset(tmp_path, seed=1, n_train=2)  # no overwrite needed, no stale images left
    assert sorted(p.name for p in (tmp_path / "mchar_train").iterdir()) == [
        "000000.png",
        "000001.png",
    ]
    assert len(read_json(tmp_path / "mchar_train.json")) == 2


def test_interrupted_run_leaves_no_label_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_render = synthetic.render_number

    def render_then_fail(digits, rng):
        nonlocal calls
        calls += 1
        if calls > 2:
            raise KeyboardInterrupt
        return real_render(digits, rng)

    monkeypatch.setattr(synthetic, "render_number", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        small_dataset(tmp_path, seed=0)
    assert not list(tmp_path.glob("*.json"))
    monkeypatch.undo()
    small_dataset(tmp_path, seed=0)  # recognised as an unfinished synthetic dataset
    assert (tmp_path / "mchar_train.json").is_file()


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    return subprocess.run(
        [sys.executable, "-m", "svhn.synthetic", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_writes_dataset_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = run_cli("--out", str(out), "--n", "4", "--seed", "1", "--max_digits", "2")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1 and "4 train" in summary[0] and str(out) in summary[0]
    labels = read_json(out / "mchar_train.json")
    assert len(labels) == 4 and all(len(e["label"]) <= 2 for e in labels.values())
    assert len(read_json(out / "mchar_test_a_labels.json")) == 1


def test_cli_refuses_foreign_folder_with_clear_message(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    result = run_cli("--out", str(tmp_path), "--n", "2")
    assert result.returncode != 0
    assert str(tmp_path) in result.stderr and "--overwrite" in result.stderr
