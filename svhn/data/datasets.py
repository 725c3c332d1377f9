"""Datasets over one split's cached images: targets, digit boxes, and the training set that
gathers whole batches at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from svhn.data.images import ImageCache
from svhn.data.labels import (
    DEFAULT_MAX_LEN,
    Sample,
    encode_label,
)
from svhn.data.layout import SplitFiles
from svhn.data.transforms import ZOOM_PRESETS, build_transform, needs_box, zoom_crop_target

__all__ = ["collate_batch", "DigitImageDataset", "TrainingSet"]


class DigitImageDataset(Dataset):
    """Cached images of one split with their encoded targets and digit boxes.

    Each item is a dict: ``image`` (3, H, W) uint8 tensor, ``target`` (max_len,) long,
    ``length`` (number of digits, 0 when unlabelled), ``box`` (4,) union box of the digits
    normalised to the image (zeros when unlabelled), ``char_boxes`` (max_len, 4) each digit's
    own box, normalised, in reading order (all zeros at blank positions, when unlabelled and
    without ``char_box_targets``; moved with the image wherever ``box`` is) and
    ``file_name``.

    ``gather_only``: no transform at all; items are the cached images at cache size with
    their boxes unmoved (``BatchAugment`` augments the batch on the model's device), and
    ``__getitems__`` gathers a whole batch with one read of the cache, already collated.
    """

    def __init__(
        self, files: SplitFiles, cache: ImageCache, preset: str, image_size: tuple[int, int],
        *, max_len: int = DEFAULT_MAX_LEN, box_targets: bool = False,
        gather_only: bool = False, char_box_targets: bool = False,
    ):
        self.files = files
        self.cache = cache
        self.max_len = max_len
        self.gather_only = gather_only
        # A normalised box only moves under geometric augmentation; resizing keeps it.
        self.track_box = not gather_only and (
            needs_box(preset) or ((box_targets or char_box_targets) and preset != "none"))
        # Each tracked box costs albumentations time: the digits' own boxes only when asked.
        self.track_chars = char_box_targets
        self.zoom_crops = preset in ZOOM_PRESETS
        self.transform = None if gather_only else build_transform(
            preset, image_size, with_box=self.track_box)
        self.names = [p.name for p in files.image_paths]
        position = {p.name: i for i, p in enumerate(cache.paths)}
        self.cache_index = np.array([position[name] for name in self.names], dtype=np.int64)
        # Zeros: "no box known" (no loss, nothing to move) unless char_box_targets asks.
        self.char_boxes = np.zeros((len(self.names), max_len, 4), dtype=np.float32)
        if files.samples is not None:
            self.targets = torch.tensor([encode_label(s.digits, max_len) for s in files.samples])
            self.lengths = torch.tensor([len(s.digits) for s in files.samples])
            sizes = cache.original_sizes[self.cache_index]
            self.boxes = _normalised_union_boxes(files.samples, sizes)
            if char_box_targets:
                self.char_boxes = _normalised_char_boxes(files.samples, sizes, max_len)
        else:
            self.targets = torch.full((len(self.names), max_len), -100, dtype=torch.long)
            self.lengths = torch.zeros(len(self.names), dtype=torch.long)
            self.boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32),
                                 (len(self.names), 1))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        if self.gather_only:
            return {key: value[0] for key, value in self.__getitems__([index]).items()}
        # A copy: the memory map is read-only, and tensors must own writable memory.
        image = np.array(self.cache.array[self.cache_index[index]])
        chars = self.char_boxes[index]
        if self.track_box:
            extra = zoom_crop_target(self.boxes[index], image.shape) if self.zoom_crops else {}
            # Label 0 is the union box, label k the digit at position k - 1.
            present = np.flatnonzero(chars[:, 2] > chars[:, 0]) if self.track_chars \
                else np.zeros(0, dtype=np.int64)
            out = self.transform(image=image, bboxes=[self.boxes[index], *chars[present]],
                                 box_labels=[0, *(present + 1)], **extra)
            moved = dict(zip(out["box_labels"], np.asarray(out["bboxes"], dtype=np.float32)))
            box = moved.get(0, np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32))
            chars = np.zeros_like(chars)  # a digit cropped away has no box to learn
            for position in present:
                chars[position] = moved.get(position + 1, 0.0)
        else:
            out, box = self.transform(image=image), self.boxes[index]
        return {
            "image": out["image"],
            "target": self.targets[index],
            "length": self.lengths[index],
            "box": torch.as_tensor(np.asarray(box, dtype=np.float32)),
            "char_boxes": torch.from_numpy(np.ascontiguousarray(chars, dtype=np.float32)),
            "file_name": self.names[index],
        }

    def __getitems__(self, indices: Sequence[int]) -> dict | list[dict]:
        """A batch (the DataLoader calls this with each batch's indices): collated in one
        gather with ``gather_only``, else the items one by one for ``collate_batch``."""
        if not self.gather_only:
            return [self[int(i)] for i in indices]
        indices = np.asarray(indices, dtype=np.int64)
        # One fancy-indexed read of the memory map: (B, H, W, 3) uint8, then a channels-last
        # (B, 3, H, W) view of it (no copy; convolutions and the warp take it as it is).
        images = torch.from_numpy(self.cache.array[self.cache_index[indices]])
        return {
            "image": images.permute(0, 3, 1, 2),
            "target": self.targets[indices],
            "length": self.lengths[indices],
            "box": torch.from_numpy(self.boxes[indices]),
            "char_boxes": torch.from_numpy(self.char_boxes[indices]),
            "file_name": [self.names[i] for i in indices],
        }


def _unit_boxes(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(..., 4) pixel (x0, y0, x1, y1) boxes divided by their image's (width, height) (``sizes``
    broadcast against ``boxes[..., :2]``) and clipped to the image."""
    scale = np.concatenate([sizes, sizes], axis=-1).astype(np.float64)
    boxes = np.clip(boxes / scale, 0.0, 1.0)
    # Degenerate boxes (zero area after clipping) would be dropped by albumentations.
    boxes[..., 2] = np.maximum(boxes[..., 2], boxes[..., 0] + 1e-3)
    boxes[..., 3] = np.maximum(boxes[..., 3], boxes[..., 1] + 1e-3)
    return np.clip(boxes, 0.0, 1.0)


def _normalised_union_boxes(samples: Sequence[Sample], original_sizes: np.ndarray) -> np.ndarray:
    boxes = np.array([s.union_box() for s in samples], dtype=np.float64)
    return _unit_boxes(boxes, original_sizes).astype(np.float32)


def _normalised_char_boxes(samples: Sequence[Sample], original_sizes: np.ndarray,
                           max_len: int) -> np.ndarray:
    """(N, max_len, 4) each digit's (x0, y0, x1, y1) box normalised to its image; zeros at
    blank positions (labels longer than max_len never get here: they are left out)."""
    out = np.zeros((len(samples), max_len, 4), dtype=np.float64)
    present = np.zeros(out.shape[:2], dtype=bool)
    for i, sample in enumerate(samples):
        for position, (left, top, width, height) in enumerate(sample.boxes[:max_len]):
            out[i, position] = (left, top, left + width, top + height)
            present[i, position] = True
    out = _unit_boxes(out, original_sizes[:, None, :])
    return np.where(present[..., None], out, 0.0).astype(np.float32)


def collate_batch(items: dict | list[dict]) -> dict:
    """The loader's collate: a batch gathered whole (``__getitems__``) is already one."""
    return items if isinstance(items, dict) else default_collate(items)


class TrainingSet(ConcatDataset):
    """The training splits as one dataset whose batches are gathered part by part."""

    def __getitems__(self, indices: Sequence[int]) -> dict | list[dict]:
        indices = np.asarray(indices, dtype=np.int64)
        part_of = np.searchsorted(self.cumulative_sizes, indices, side="right")
        starts = np.array([0, *self.cumulative_sizes[:-1]], dtype=np.int64)
        order, pieces = [], []
        for part in np.unique(part_of):
            chosen = np.flatnonzero(part_of == part)
            order.append(chosen)
            pieces.append(self.datasets[part].__getitems__(indices[chosen] - starts[part]))
        if len(pieces) == 1:
            return pieces[0]
        back = np.argsort(np.concatenate(order))  # positions in the batch's own order
        if isinstance(pieces[0], list):
            flat = [item for piece in pieces for item in piece]
            return [flat[i] for i in back]
        batch = {}
        for key in pieces[0]:
            if key == "file_name":
                names = [name for piece in pieces for name in piece[key]]
                batch[key] = [names[i] for i in back]
            else:
                batch[key] = torch.cat([piece[key] for piece in pieces])[torch.from_numpy(back)]
        return batch
