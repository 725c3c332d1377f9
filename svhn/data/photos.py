"""Any photo a person has, read the way evaluation reads a split's images.

A split's image is decoded once into the cache at the cache size (``read_resized``), then
resized to the evaluation size (the ``none`` transform); a photo goes through the same two
steps here, without a cache, so ``svhn.read`` on a split's files sees the pixels
``svhn.predict`` sees. A file that cannot be read is set aside with its reason, and the
others are still read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from svhn.data.images import ImageReadError, read_resized
from svhn.data.transforms import build_transform
from svhn.errors import SettingError

__all__ = ["decode_photos", "PHOTO_SUFFIXES", "photo_paths", "PhotoDataModule", "Photos"]

# What a folder is searched for (a file named on the command line is read whatever its name).
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_PROGRESS_FROM = 64  # photos: fewer decode too fast for a progress bar to help


def photo_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named, and those directly in the folders named (by name), each once
    in the order given. A path that does not exist, or a folder without images, is refused
    before anything is read."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.iterdir()
                            if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
            if not images:
                raise SettingError(f"{item}: no image files in this folder (looked for "
                                   f"{', '.join(PHOTO_SUFFIXES)}); name the files instead.")
            found.extend(images)
        elif item.is_file():
            found.append(item)
        else:
            raise SettingError(f"{item}: no such file or folder.")
    unique: dict[Path, Path] = {}  # each file once, at its first mention
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


@dataclass
class Photos:
    """Decoded photos: names (as given), uint8 (N, 3, H, W) images at the evaluation size,
    each photo's full upright size (N, 2) as (width, height), and the files that could not
    be read, with why."""

    names: list[str]
    images: torch.Tensor
    sizes: torch.Tensor
    failed: dict[str, str] = field(default_factory=dict)


def decode_photos(paths: Sequence[Path], cache_size: tuple[int, int],
                  eval_size: tuple[int, int], progress: bool = True) -> Photos:
    """Each photo as a split's image is fed at evaluation (``cache_size`` then
    ``eval_size``, (height, width)); unreadable ones are listed in ``failed``, not raised."""
    resize = build_transform("none", eval_size)
    names, images, sizes, failed = [], [], [], {}
    for path in tqdm(paths, desc="Decoding", unit="image",
                     disable=not progress or len(paths) < _PROGRESS_FROM):
        try:
            pixels, size = read_resized(path, cache_size)
        except (ImageReadError, OSError) as err:
            failed[str(path)] = str(err)
            continue
        names.append(str(path))
        images.append(resize(image=np.array(pixels))["image"])  # writable: a tensor owns it
        sizes.append(size)
    height, width = eval_size
    return Photos(names=names,
                  images=torch.stack(images) if images else
                  torch.empty((0, 3, height, width), dtype=torch.uint8),
                  sizes=torch.tensor(sizes, dtype=torch.float32).view(-1, 2),
                  failed=failed)


class _PhotoSet(Dataset):
    """Items as a split's evaluation set gives them (no label: placeholder targets)."""

    def __init__(self, photos: Photos, max_len: int):
        self.photos = photos
        self.names = photos.names
        self.target = torch.full((max_len,), -100, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.photos.images[index], "target": self.target,
                "file_name": self.names[index]}


class PhotoDataModule(L.LightningDataModule):
    """Decoded photos as a data module to predict on (the prediction path reads any data
    module with a ``predict_set`` whose ``names`` it answers for)."""

    def __init__(self, photos: Photos, max_len: int, batch_size: int):
        super().__init__()
        self.predict_set = _PhotoSet(photos, max_len)
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=self.batch_size, shuffle=False)

