"""k-fold cross-validation over the labelled images of train and val together.

``--data.folds K --data.fold i`` (``SVHNDataModule``): every labelled image of ``mchar_train``
and ``mchar_val`` (each once: the two folders reuse file names, so an image is the pair
``(split, file name)``) is given one of K folds by one fixed shuffle; fold i is validated
on, the other K - 1 are trained on. The shuffle has its own seed (``FOLD_SEED``), not the
global one, so every fold of a recipe, whatever its ``seed_everything``, sees the same
partition: the folds are disjoint and together hold every labelled image. It is drawn
before ``max_len`` leaves long labels out, so that setting does not move images between
folds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from svhn.data.labels import load_labels
from svhn.data.layout import SplitFiles, split_paths
from svhn.errors import SettingError

__all__ = ["assign_folds", "check_fold_settings", "FOLD_SEED", "FOLD_SPLITS", "fold_part",
           "labelled_keys"]

FOLD_SPLITS = ("train", "val")  # what the folds are cut from, together
FOLD_SEED = 0  # the partition's own seed: the same for every run of every recipe

ImageKey = tuple[str, str]  # (split, file name): file names repeat across the splits


def check_fold_settings(folds: int | None, fold: int | None, train_on: Iterable[str],
                        val_on: str, train_subset: int | None = None) -> None:
    """SettingError naming the flag and its range for folds settings that cannot be
    honoured; nothing when folds are off and no fold is named (the usual split)."""
    if folds is None:
        if fold is not None:
            raise SettingError(f"--data.fold {fold}: a fold needs --data.folds K (K >= 2, "
                               "the number of folds train + val are cut into).")
        return
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise SettingError(f"--data.folds {folds}: the number of folds must be an integer "
                           ">= 2 (None: no cross-validation, the usual train/val split).")
    if fold is None:
        raise SettingError(f"--data.folds {folds}: name the fold to hold out with "
                           f"--data.fold i (0 <= i < {folds}), one run per fold.")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise SettingError(f"--data.fold {fold}: out of range for --data.folds {folds}; "
                           f"choose 0 <= fold < {folds}.")
    train_on = [train_on] if isinstance(train_on, str) else list(train_on)
    if [str(s) for s in train_on] != ["train"] or str(val_on) != "val":
        raise SettingError(
            f"--data.folds {folds} with train_on {list(train_on)} and val_on {val_on!r}: "
            "the folds are cut from train + val together (fold i validated on, the rest "
            "trained on), so train_on and val_on must stay at their defaults ([train] and "
            "val). For a final fit on everything use --data.train_on '[train, val]' "
            "without folds, or ensemble the K fold checkpoints.")
    if train_subset is not None:
        raise SettingError(f"--data.train_subset {train_subset} with --data.folds {folds}: "
                           "not combined (train_subset cuts the train split; with folds, "
                           "training draws on train and val together); drop one of them.")


def labelled_keys(root: str | Path, splits: Sequence[str] = FOLD_SPLITS) -> list[ImageKey]:
    """Every labelled image of ``splits`` under ``root`` as (split, file name), sorted:
    each entry of the label files, whatever its length."""
    keys = []
    for split in splits:
        label_file = split_paths(Path(root), split)[1]
        keys += [(split, sample.file_name) for sample in load_labels(label_file)]
    return sorted(set(keys))


def assign_folds(keys: Iterable[ImageKey], folds: int,
                 seed: int = FOLD_SEED) -> dict[ImageKey, int]:
    """The fold (0 .. folds - 1) of each image: one seeded shuffle of the sorted keys dealt
    round the folds, so fold sizes differ by at most one and the same keys always get the
    same folds."""
    ordered = sorted(set(keys))
    if len(ordered) < folds:
        raise SettingError(f"--data.folds {folds}: only {len(ordered)} labelled images in "
                           f"{' + '.join(FOLD_SPLITS)}, fewer than the folds; choose at most "
                           f"{len(ordered)}.")
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[index]: rank % folds for rank, index in enumerate(order)}


def fold_part(files: SplitFiles, assignment: dict[ImageKey, int], fold: int,
              held_out: bool) -> SplitFiles:
    """The images of one split in fold ``fold`` (``held_out``) or in the other folds."""
    keep = [i for i, path in enumerate(files.image_paths)
            if (assignment[(files.name, path.name)] == fold) == held_out]
    samples = None if files.samples is None else [files.samples[i] for i in keep]
    return SplitFiles(files.name, [files.image_paths[i] for i in keep], samples)
