"""Images without labels, and the pseudo-labels a teacher's confident readings make of them.

``--data.unlabelled`` names a split of the data folder (``test_a``) or a folder of images.
It may never be an image a run validates on or trains on with its true label: the split
validated on is refused in one line, and so are the splits trained on (a leak, or labels
thrown away). Its pseudo-labels are ``Sample``s like the competition's (digits and each
digit's box in pixels), so the training datasets, augmentation and the detector's targets
take them unchanged.

The pseudo-labelled images join each epoch beside the labelled ones (the epoch grows; the
schedule follows: ``svhn.train.time_budget``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from svhn.data.labels import BLANK, Sample
from svhn.data.layout import IMAGE_SUFFIXES, SPLITS, DataError, SplitFiles, split_images
from svhn.errors import SettingError

__all__ = ["check_unlabelled_source", "pseudo_samples", "unlabelled_files"]


def unlabelled_files(data_dir: Path, source: str) -> SplitFiles:
    """The images of ``source``: a split of ``data_dir`` (``test_a``) or a folder of images,
    in file-name order, without labels."""
    if source in SPLITS:
        return SplitFiles(source, split_images(data_dir, source), None)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.unlabelled {source}: neither a split ({', '.join(SPLITS)}) "
                        "nor a folder of images. Name the split (test_a) or a folder.")
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file()
                       and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
    if not names:
        raise DataError(f"data.unlabelled {folder}: no image in it ({', '.join(IMAGE_SUFFIXES)}"
                        "). Name a folder that holds the unlabelled images.")
    return SplitFiles(folder.name, [folder / name for name in names], None)


def check_unlabelled_source(source: str | None, data_dir: Path, train_on: Sequence[str],
                            val_on: str, folds: int | None) -> None:
    """SettingError when the unlabelled images are ones the run validates on or trains on
    with their labels: a split by name, or a folder that is one of those splits' folders."""
    if source is None:
        return
    validated = ["train", "val"] if folds is not None else [val_on]
    trained = ["train", "val"] if folds is not None else list(train_on)
    split = source if source in SPLITS else _split_of_folder(Path(source), data_dir)
    if split in validated:
        raise SettingError(
            f"data.unlabelled {source}: those are the images this run validates on "
            f"({'the folds of train and val' if folds is not None else f'val_on {val_on}'}); "
            "their pseudo-labels would leak the score. Name images the run never scores "
            "(test_a, or a folder of other images).")
    if split in trained:
        raise SettingError(
            f"data.unlabelled {source}: the run already trains on that split with its "
            "labels (train_on). Name images without labels (test_a, or a folder).")


def _split_of_folder(folder: Path, data_dir: Path) -> str | None:
    """The split whose image folder ``folder`` is (after resolving links), if any."""
    try:
        resolved = folder.expanduser().resolve()
    except OSError:
        return None
    for split, (name, _) in SPLITS.items():
        if (Path(data_dir) / name).resolve() == resolved:
            return split
    return None


def pseudo_samples(names: Sequence[str], probs: torch.Tensor, char_boxes: torch.Tensor,
                   confidence: torch.Tensor, sizes: np.ndarray, threshold: float
                   ) -> list[Sample]:
    """The confident readings as training samples.

    ``probs`` (N, max_len, 11) and ``char_boxes`` (N, max_len, 4) are the reader's answer
    and its digits' boxes in whole-image fractions (x0, y0, x1, y1); ``sizes`` (N, 2) each
    image's (width, height) in pixels; ``confidence`` (N,) how sure the answer is
    (``svhn.model.vote.answer_confidence``). An image is kept when its confidence is at least
    ``threshold`` and each digit read has a box; blanks are dropped wherever they stand, as
    the submission decodes. Boxes become the labels' pixel (left, top, width, height)."""
    classes = probs.argmax(-1).cpu()
    boxes = char_boxes.float().cpu().clamp(0, 1)
    sure = (confidence.cpu() >= threshold).tolist()
    samples = []
    for row, name in enumerate(names):
        positions = (classes[row] != BLANK).nonzero().flatten()
        if not sure[row] or len(positions) == 0:
            continue  # unsure, or nothing read: no target to learn from
        width, height = (float(v) for v in sizes[row])
        digit_boxes = []
        for x0, y0, x1, y1 in boxes[row, positions].tolist():
            if x1 <= x0 or y1 <= y0:
                break  # a digit without a place: the detector could not learn it
            digit_boxes.append((x0 * width, y0 * height, (x1 - x0) * width,
                                (y1 - y0) * height))
        else:
            samples.append(Sample(name, tuple(int(c) for c in classes[row, positions]),
                                  tuple(digit_boxes)))
    return samples
