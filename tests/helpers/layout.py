"""The one writer of the competition layout for the tests.

A layout is a folder holding, per split, ``mchar_<split>/`` with the images and (train, val)
``mchar_<split>.json`` with the labels; test-A labels, which only a synthetic set has, go to
``mchar_test_a_labels.json`` as ``svhn.data.synthetic`` writes them. Label entries are the
competition's: ``{"label": [digits], "left": [...], "top": [...], "width": [...],
"height": [...]}``, one box per digit in pixels.

``svhn.data.synthetic.generate_dataset`` is the project's own source of realistic data; this
writes small, exact layouts whose every value a test can name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image

LABEL_FILES = {"train": "mchar_train.json", "val": "mchar_val.json",
               "test_a": "mchar_test_a_labels.json"}
SAMPLE_SUBMISSION = "mchar_sample_submit_A.csv"
IMAGE_SIZE = (40, 20)  # (width, height) of the images write_split makes unless told

# name -> digits (boxes from ``entry``) or a whole label entry (written as given); or the
# image names alone, for a split without labels.
Labels = Mapping[str, "list[int] | dict"] | Sequence[str]
# None: the colour (40 i mod 255, 100, 50) for the i-th image; an RGB triple for all of
# them; or a function of the file name that returns the picture.
ImageSource = Callable[[str], Image.Image] | tuple[int, int, int] | None


def entry(digits: Sequence[int], *, at: tuple[float, float] = (5, 2),
          size: tuple[float, float] = (8, 15), step: float = 10, **fields) -> dict:
    """A label entry for ``digits``: digit k's box is ``size`` (width, height) pixels with
    its top-left corner at ``at`` (left, top) moved ``step`` pixels right per digit, inside
    a 40x20 image for up to 3 digits. ``fields`` replace keys as given (``top=[-3, 2]``;
    ``top=5``, a broken entry)."""
    n = len(digits)
    (left, top), (width, height) = at, size
    return {"label": list(digits), "left": [left + step * k for k in range(n)],
            "top": [top] * n, "width": [width] * n, "height": [height] * n, **fields}


def label_entries(labels: Mapping[str, list[int] | dict]) -> dict[str, dict]:
    return {name: value if isinstance(value, dict) else entry(value)
            for name, value in labels.items()}


def write_labels(path: Path, labels: Mapping[str, list[int] | dict],
                 encoding: str = "utf-8") -> Path:
    """A label file at ``path``: name -> digits (boxes from ``entry``) or entry as given."""
    path.write_text(json.dumps(label_entries(labels)), encoding=encoding)
    return path


def read_labels(path: Path) -> dict[str, dict]:
    """A label file's entries as written (to break one and write them back)."""
    return json.loads(path.read_text())


def write_split(root: Path, split: str, labels: Labels, *, size: tuple[int, int] = IMAGE_SIZE,
                image: ImageSource = None) -> Path:
    """``mchar_<split>/`` under ``root`` with one PNG of ``size`` (width, height) per name,
    in the order given, and the split's label file unless ``labels`` names images only.
    Returns ``root``."""
    folder = root / f"mchar_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(labels)
    for i, name in enumerate(names):
        if callable(image):
            picture = image(name)
        else:
            picture = Image.new("RGB", size, image or (i * 40 % 255, 100, 50))
        picture.save(folder / name)
    if isinstance(labels, Mapping):
        write_labels(root / LABEL_FILES[split], labels)
    return root


def write_layout(root: Path, *, train: Labels | None = None, val: Labels | None = None,
                 test_a: Labels | None = None, size: tuple[int, int] = IMAGE_SIZE,
                 image: ImageSource = None, sample_submission: bool = False) -> Path:
    """The splits given (``write_split`` each), and with ``sample_submission`` the sample
    submission of the test-A images (file_code 0). Returns ``root``."""
    for split, labels in (("train", train), ("val", val), ("test_a", test_a)):
        if labels is not None:
            write_split(root, split, labels, size=size, image=image)
    if sample_submission:
        write_sample_submission(root, test_a or ())
    return root


def write_sample_submission(root: Path, names) -> Path:
    """The competition's sample submission for the test-A images ``names`` (file_code 0)."""
    (root / SAMPLE_SUBMISSION).write_text(
        "file_name,file_code\n" + "".join(f"{name},0\n" for name in sorted(names)))
    return root
