"""The competition layout on disk: splits, their image folders and label files, checks that
say what is missing and how to fix it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from svhn.console import DataWarning
from svhn.data.labels import (
    Sample,
    load_labels,
    split_by_length,
)
from svhn.errors import SettingError, SvhnError

__all__ = ["check_layout", "DataError", "fixed_subset", "has_competition_data",
           "holds_nothing_of_the_competition", "IMAGE_SUFFIXES", "is_generated_set",
           "list_split", "split_images", "split_paths", "SplitFiles", "SPLITS",
           "SYNTHETIC_TEST_LABELS"]

SPLITS = {
    "train": ("mchar_train", "mchar_train.json"),
    "val": ("mchar_val", "mchar_val.json"),
    "test_a": ("mchar_test_a", None),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


_DATA_HELP = (
    "Download the competition files (mchar_train.zip, mchar_train.json, mchar_val.zip, "
    "mchar_val.json, mchar_test_a.zip) and unpack them there; see data/README.md."
)


class DataError(SvhnError, ValueError):
    """The data folder does not hold what the competition layout needs."""


@dataclass
class SplitFiles:
    """What one split holds on disk: image paths in file-name order and their labels."""

    name: str
    image_paths: list[Path]
    samples: list[Sample] | None  # None for unlabelled splits


def has_competition_data(data_dir: str | Path) -> bool:
    data_dir = Path(data_dir)
    return (data_dir / "mchar_train").is_dir() and (data_dir / "mchar_train.json").is_file()


def holds_nothing_of_the_competition(data_dir: str | Path) -> bool:
    """No folder, or a folder without any ``mchar_*`` entry (folder, JSON or archive)."""
    data_dir = Path(data_dir)
    return not data_dir.exists() or (data_dir.is_dir()
                                     and not any(data_dir.glob("mchar_*")))


# Test-A labels: the competition never gives them; svhn.data.synthetic writes them into
# every set it generates, so their presence marks a generated (synthetic) set.
SYNTHETIC_TEST_LABELS = "mchar_test_a_labels.json"


def is_generated_set(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` is a set that ``svhn.data.synthetic`` generated."""
    return (Path(data_dir) / SYNTHETIC_TEST_LABELS).is_file()


def check_layout(data_dir: str | Path, splits: Sequence[str], labelled: bool = True) -> None:
    """Raise one DataError naming the folder and everything these splits need that is not
    there (image folders and, when ``labelled``, label files), with a hint when the cause is
    plain to see."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"{data_dir}: is a file, not a folder. data_dir names the folder that "
                        f"holds mchar_train/, mchar_train.json, mchar_val/, ... {_DATA_HELP}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found (is the path right?). {_DATA_HELP}")
    missing, hints = [], []
    for split in dict.fromkeys(splits):
        image_dir, label_file = split_paths(data_dir, split)
        if not image_dir.is_dir():
            missing.append(f"{image_dir.name}/")
            if image_dir.with_suffix(".zip").is_file():
                hints.append(f"{image_dir.name}.zip is there: unpack it.")
        if labelled and label_file is not None and not label_file.is_file():
            missing.append(label_file.name)
    if not missing:
        return
    nested = sorted(p for p in data_dir.iterdir() if p.is_dir() and has_competition_data(p))
    if nested:
        hints.append(f"{nested[0]} holds the competition files: did you mean "
                     f"--data.data_dir {nested[0]}?")
    raise DataError(
        f"{data_dir}: not the competition layout; missing {', '.join(missing)}. "
        + " ".join(hints + [_DATA_HELP])
    )


def split_paths(data_dir: Path, split: str) -> tuple[Path, Path | None]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}.")
    folder, labels = SPLITS[split]
    return data_dir / folder, (data_dir / labels) if labels else None


def split_images(data_dir: str | Path, split: str) -> list[Path]:
    """Every image file of a split's folder, in file-name order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found. {_DATA_HELP}")
    image_dir, _ = split_paths(data_dir, split)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder for split {split!r} not found. {_DATA_HELP}")
    # Names sorted as strings and kinds read from the directory itself (no stat per file):
    # Path objects and their stats cost seconds for the competition's 40,000 test images.
    with os.scandir(image_dir) as entries:
        named = sorted((e for e in entries if os.path.splitext(e.name)[1].lower()
                        in IMAGE_SUFFIXES), key=lambda e: e.name)
    # A folder, or macOS's "._x.png" metadata beside x.png, is named like an image but is none.
    kept = [e for e in named if e.is_file() and not e.name.startswith("._")]
    paths = [image_dir / e.name for e in kept]
    if len(kept) < len(named):
        images = {e.name for e in kept}
        skipped = sorted(e.name + ("/" if e.is_dir() else "") for e in named
                         if e.name not in images)
        warnings.warn(f"{image_dir}: {len(skipped)} entries named like images are not images "
                      f"and are skipped (first: {', '.join(skipped[:5])}).", DataWarning,
                      stacklevel=2)
    if not paths:
        raise DataError(f"{image_dir}: no images found for split {split!r}.")
    return paths


def list_split(data_dir: str | Path, split: str, max_len: int | None = None) -> SplitFiles:
    """Match a split's images with its labels, with a clear error for whatever is off."""
    image_paths = split_images(data_dir, split)
    image_dir, label_file = split_paths(Path(data_dir), split)
    if label_file is None:
        return SplitFiles(split, image_paths, None)
    on_disk = {p.name: p for p in image_paths}

    samples = load_labels(label_file)
    missing = [s.file_name for s in samples if s.file_name not in on_disk]
    if missing:
        raise DataError(
            f"{label_file}: {len(missing)} labelled image(s) are missing from {image_dir} "
            f"(first: {', '.join(missing[:5])}). Unpack the whole archive for this split."
        )
    unlabelled = sorted(set(on_disk) - {s.file_name for s in samples})
    if unlabelled:
        warnings.warn(
            f"{image_dir}: {len(unlabelled)} image(s) have no entry in {label_file.name} and "
            f"are ignored (first: {', '.join(unlabelled[:5])}).",
            DataWarning, stacklevel=2,
        )
    if max_len is not None:
        kept, too_long = split_by_length(samples, max_len, source=str(label_file))
        if not kept:
            longest = max(too_long, key=lambda s: len(s.digits))
            raise DataError(
                f"{label_file}: every one of its {len(too_long)} labels is longer than "
                f"max_len={max_len} (e.g. entry {longest.file_name!r} has "
                f"{len(longest.digits)} digits), so split {split!r} would be empty. Set "
                f"--data.max_len {len(longest.digits)}, or check that this is the right file."
            )
        samples = kept
    return SplitFiles(split, [on_disk[s.file_name] for s in samples], samples)


def fixed_subset(files: SplitFiles, count: int, seed: int = 0) -> SplitFiles:
    """The first ``count`` labelled images of one fixed shuffle (kept in file order)."""
    total = len(files.image_paths)
    if count > total:
        raise SettingError(f"train_subset {count}: the {files.name} split has only {total} "
                         f"labelled images; ask for at most {total}, or None for all.")
    chosen = np.sort(np.random.default_rng(seed).permutation(total)[:count])
    return SplitFiles(files.name, [files.image_paths[i] for i in chosen],
                      [files.samples[i] for i in chosen])
