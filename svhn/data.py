"""The competition layout as datasets and a LightningDataModule.

Layout under one root: ``mchar_train/`` + ``mchar_train.json``, ``mchar_val/`` +
``mchar_val.json``, ``mchar_test_a/`` (no labels). Images are decoded once into a cache (see
``svhn.images``); training augments the small cached uint8 arrays, either per item on the
CPU (albumentations, ``svhn.transforms``) or per batch on the model's device
(``svhn.batch_augment``), where the loader only gathers cached images and boxes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from svhn.batch_augment import BatchAugment, derive_seed
from svhn.images import DEFAULT_IMAGE_SIZE, ImageCache, default_cache_dir
from svhn.labels import (
    DEFAULT_MAX_LEN,
    Sample,
    clip_boxes_to_images,
    encode_label,
    load_labels,
    split_by_length,
)
from svhn.transforms import PRESETS, ZOOM_PRESETS, build_transform, needs_box, zoom_crop_target

SPLITS = {
    "train": ("mchar_train", "mchar_train.json"),
    "val": ("mchar_val", "mchar_val.json"),
    "test_a": ("mchar_test_a", None),
}
DEFAULT_DATA_DIR = Path("data/mchar")  # where an unset data_dir looks (the README's place)
SYNTHETIC_DIR = Path("data/synthetic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUGMENT_ON = ("auto", "cpu", "device")
# What ``augment_on: auto`` picks on a CPU-only run (on an accelerator it is always
# "device"): see the README's Performance section for the measurement behind it.
AUTO_ON_CPU = "device"
DATA_HELP = (
    "Download the competition files (mchar_train.zip, mchar_train.json, mchar_val.zip, "
    "mchar_val.json, mchar_test_a.zip) and unpack them there; see data/README.md."
)


class DataError(ValueError):
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


def check_layout(data_dir: str | Path, splits: Sequence[str], labelled: bool = True) -> None:
    """Raise one DataError naming the folder and everything these splits need that is not
    there (image folders and, when ``labelled``, label files), with a hint when the cause is
    plain to see."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"{data_dir}: is a file, not a folder. data_dir names the folder that "
                        f"holds mchar_train/, mchar_train.json, mchar_val/, ... {DATA_HELP}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found (is the path right?). {DATA_HELP}")
    missing, hints = [], []
    for split in dict.fromkeys(splits):
        image_dir, label_file = _split_paths(data_dir, split)
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
        + " ".join(hints + [DATA_HELP])
    )


def _split_paths(data_dir: Path, split: str) -> tuple[Path, Path | None]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}.")
    folder, labels = SPLITS[split]
    return data_dir / folder, (data_dir / labels) if labels else None


def split_images(data_dir: str | Path, split: str) -> list[Path]:
    """Every image file of a split's folder, in file-name order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found. {DATA_HELP}")
    image_dir, _ = _split_paths(data_dir, split)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder for split {split!r} not found. {DATA_HELP}")
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{image_dir}: no images found for split {split!r}.")
    return paths


def list_split(data_dir: str | Path, split: str, max_len: int | None = None) -> SplitFiles:
    """Match a split's images with its labels, with a clear error for whatever is off."""
    image_paths = split_images(data_dir, split)
    image_dir, label_file = _split_paths(Path(data_dir), split)
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
            stacklevel=2,
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
        max_len: int = DEFAULT_MAX_LEN, box_targets: bool = False, gather_only: bool = False,
        char_box_targets: bool = False,
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


def fixed_subset(files: SplitFiles, count: int, seed: int = 0) -> SplitFiles:
    """The first ``count`` labelled images of one fixed shuffle (kept in file order)."""
    total = len(files.image_paths)
    if count > total:
        raise ValueError(f"train_subset {count}: the {files.name} split has only {total} "
                         f"labelled images; ask for at most {total}, or None for all.")
    chosen = np.sort(np.random.default_rng(seed).permutation(total)[:count])
    return SplitFiles(files.name, [files.image_paths[i] for i in chosen],
                      [files.samples[i] for i in chosen])


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


def fallback_notice(synthetic_size: int) -> str:
    """The framed notice that training uses the synthetic quick-start set."""
    return framed([
        "NO COMPETITION DATA: training on SYNTHETIC house numbers (the quick start).",
        f"Looked in {DEFAULT_DATA_DIR.resolve()}: nothing there.",
        f"Training on {SYNTHETIC_DIR}/ ({synthetic_size:,} generated training images, made "
        "once).",
        f"Real data: unpack the competition files into {DEFAULT_DATA_DIR}/ (see "
        "data/README.md)",
        "or name their folder with --data.data_dir PATH.",
    ])


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




def framed(lines: Sequence[str]) -> str:
    """Lines between two rules of ``=``, so a message stands out among the training logs
    (no right border: a long command stays copyable)."""
    rule = "=" * min(max(len(line) for line in lines) + 2, 88)
    return "\n".join([rule, *(f" {line}" for line in lines), rule])


def _seed_worker_augmentations(worker_id: int) -> None:
    """Give each worker its own augmentation stream (forked workers share the parent's)."""
    info = torch.utils.data.get_worker_info()
    seed = int(torch.initial_seed() % 2**32)
    datasets = info.dataset.datasets if isinstance(info.dataset, ConcatDataset) else [
        info.dataset]
    for ds in datasets:
        if ds.transform is not None:  # gather-only datasets have nothing random
            ds.transform.set_random_seed(seed)


def default_num_workers() -> int:
    """No workers on 2 cores or fewer: a worker would only take a core from the model."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


class SVHNDataModule(L.LightningDataModule):
    """Train / val / test / predict dataloaders over the competition layout.

    Args:
        data_dir: root of the competition layout; a folder named here must hold it. Unset
            (None, the embedded default): ``data/mchar``; only when that holds nothing of
            the competition (no folder, or no ``mchar_*`` entry in it) and
            ``synthetic_fallback`` is on does training use the synthetic set instead.
        image_size: (height, width) the model sees.
        batch_size: images per batch (per device).
        num_workers: dataloader workers; None picks 0 on <= 2 cpus, else min(8, cpus - 1).
        max_len: positions per target; longer labels are left out with a warning.
        augment: training preset: none, baseline, strong, zoom or zoom_plain.
        augment_on: where the training preset runs: ``cpu`` (albumentations per item in the
            loader), ``device`` (``svhn.batch_augment`` on whole batches where the model runs,
            after the copy to it; the loader only gathers cached images) or ``auto``: device
            on an accelerator, and on a CPU-only run whichever the README measured faster
            there (``AUTO_ON_CPU``). Device augmentation draws its random parameters from a
            generator seeded by the global seed, the rank and the epoch: a seeded run repeats,
            DDP ranks differ, and a resumed run augments its later epochs as an unbroken run
            does. Evaluation is never augmented, so both choices validate alike.
        train_on: splits to train on; ("train", "val") for a final submission.
        train_subset: train on only this many images of the ``train`` split (None: all):
            the first ones of one fixed shuffle, so every run with the same number sees the
            same images and a smaller subset lies inside a larger one (data-efficiency
            curves). Other splits and extra training folders are not cut.
        val_on: split for validation (checkpoint choice) and test.
        predict_on: split to predict.
        predict_labelled: predict only the labelled images of predict_on, with their targets
            (error analysis); by default every image, labelled or not (a submission).
        cache_dir: where decoded images are cached (default data/cache/<dataset>-<hash>).
        cache_scale: cache images at this multiple of image_size (crops keep detail).
        eval_scale: validation/test/predict images at this multiple of image_size; a model
            that zooms reads the whole image at image_size, then crops the digits from this
            sharper copy (keep cache_scale >= eval_scale).
        box_targets: keep the digits' box right through every augmentation (for a model
            with a box head; ``svhn.fit`` links it to ``model.box_head``).
        char_box_targets: also each digit's own box (``char_boxes``; for a model with
            ``char_boxes``, linked likewise); without it they are zeros, "not known".
        synthetic_fallback: when data_dir is unset and data/mchar holds nothing of the
            competition, generate a synthetic set under data/synthetic and train on it (the
            quick start of svhn.fit). Never applies to a data_dir that was named.
        synthetic_size: number of synthetic training images for that fallback.
        extra_train: more folders in the competition layout whose train split joins
            training (e.g. a set made with ``python -m svhn.synthetic``).
        synthetic_extra: generate this many synthetic images once (under
            data/synthetic_extra_<n>) and train on them beside the real ones.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
        batch_size: int = 64,
        num_workers: int | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        augment: str = "baseline",
        augment_on: str = "auto",
        train_on: tuple[str, ...] = ("train",),
        train_subset: int | None = None,
        val_on: str = "val",
        predict_on: str = "test_a",
        predict_labelled: bool = False,
        cache_dir: str | None = None,
        cache_scale: float = 1.0,
        eval_scale: float = 1.0,
        box_targets: bool = False,
        char_box_targets: bool = False,
        synthetic_fallback: bool = False,
        synthetic_size: int = 2000,
        extra_train: tuple[str, ...] = (),
        synthetic_extra: int = 0,
    ):
        super().__init__()
        if augment not in PRESETS:  # here, not at setup: a refused run must write nothing
            raise ValueError(f"augment {augment!r}: choose one of {PRESETS}.")
        self.save_hyperparameters()
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be a number of images >= 1, not "
                             f"{train_subset} (None: the whole train split).")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, not {augment_on!r}.")
        self.uses_synthetic_fallback = (data_dir is None and synthetic_fallback
                                        and holds_nothing_of_the_competition(DEFAULT_DATA_DIR))
        if self.uses_synthetic_fallback:
            self.data_dir = SYNTHETIC_DIR
            print(fallback_notice(synthetic_size), flush=True)  # stdout: read first
        else:
            self.data_dir = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.cache_size = self._scaled(cache_scale)
        self.eval_size = self._scaled(eval_scale)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.data_dir)
        self.datasets: dict[str, DigitImageDataset] = {}
        self._listed_files: dict[str, SplitFiles] = {}  # labels read and checked
        self._checked_files: dict[str, SplitFiles] = {}  # ... and boxes against images
        self.batch_augment: BatchAugment | None = None  # set by setup("fit") when on device
        self.training_images: dict[str, int] | None = None  # set by setup("fit")
        self._augment_epoch: int | None = None
        self.extra_train_dirs = [Path(d) for d in extra_train]
        if synthetic_extra > 0:
            self.extra_train_dirs.append(Path(f"data/synthetic_extra_{synthetic_extra}"))

    def _scaled(self, scale: float) -> tuple[int, int]:
        return round(self.image_size[0] * scale), round(self.image_size[1] * scale)

    @staticmethod
    def evaluation_settings(hparams: dict) -> dict:
        """The data settings (from a checkpoint's datamodule hparams) that decide what the
        model is fed at evaluation, so prediction feeds it the same."""
        keys = ("image_size", "cache_scale", "eval_scale", "max_len")
        return {k: hparams[k] for k in keys if k in hparams}

    # -- data on disk -------------------------------------------------------------------
    def _synthetic_needed(self) -> bool:
        """The fallback set is generated once and reused while its size matches."""
        if not self.uses_synthetic_fallback:
            return False
        if not has_competition_data(self.data_dir):
            return True
        return len(list((self.data_dir / "mchar_train").glob("*.png"))) != \
            self.hparams.synthetic_size

    def prepare_data(self) -> None:
        """Runs once per machine, before anything is trained or written: generate synthetic
        sets, check the layout, labels and boxes, decode images into the caches."""
        from svhn.synthetic import generate_dataset

        if self._synthetic_needed():
            generate_dataset(self.data_dir, n_train=self.hparams.synthetic_size, seed=0)
        extra = self.hparams.synthetic_extra
        if extra > 0 and not has_competition_data(self.extra_train_dirs[-1]):
            # Seed 1: never the same images as the seed-0 fallback set.
            generate_dataset(self.extra_train_dirs[-1], n_train=extra, n_val=1, n_test=1,
                             seed=1, progress=True)
        stage = self.trainer.state.fn if self.trainer is not None else None
        labelled, unlabelled = self._splits_in_use(stage)
        check_layout(self.data_dir, labelled)
        check_layout(self.data_dir, unlabelled, labelled=False)
        extra = self.extra_train_dirs if stage in (None, "fit") else []
        for root in extra:
            check_layout(root, ["train"])
        sources = [(self.data_dir, split) for split in labelled] + [(root, "train")
                                                                   for root in extra]
        for root, split in sources:  # every label file read and checked before any decoding
            self._listed(split, root)
        for root, split in sources:
            self._labelled_files(split, root)
        for split in unlabelled:
            self._built_cache(split, self.data_dir)

    def _splits_in_use(self, stage: str | None) -> tuple[list[str], list[str]]:
        """(labelled, unlabelled) splits a stage reads: training and validation splits must
        exist with their labels; outside prediction the predict split is cached if present."""
        predict_on = self.hparams.predict_on
        if stage == "predict":
            return [], [predict_on]
        labelled = list(dict.fromkeys([*self.hparams.train_on, self.hparams.val_on]))
        present = _split_paths(self.data_dir, predict_on)[0].is_dir()
        return labelled, [predict_on] if present and predict_on not in labelled else []

    def _labelled_files(self, split: str, root: Path) -> SplitFiles:
        """A labelled split's files with labels checked against max_len and boxes checked
        against their images (partly outside: clipped; wholly outside: refused), once per
        split and process."""
        key = f"{root}:{split}"
        if key not in self._checked_files:
            files = self._listed(split, root)
            cache = self._built_cache(split, root)
            sizes = dict(zip((p.name for p in cache.paths),
                             map(tuple, cache.original_sizes.tolist())))
            label_file = _split_paths(root, split)[1]
            samples = clip_boxes_to_images(files.samples, sizes, str(label_file))
            self._checked_files[key] = SplitFiles(split, files.image_paths, samples)
        return self._checked_files[key]

    def _listed(self, split: str, root: Path) -> SplitFiles:
        """``list_split`` once per split and process (its warnings are given once)."""
        key = f"{root}:{split}"
        if key not in self._listed_files:
            self._listed_files[key] = list_split(root, split, self.hparams.max_len)
        return self._listed_files[key]

    def _built_cache(self, split: str, root: Path) -> ImageCache:
        cache = self._cache_for(split, root)
        if not cache.is_fresh():  # outside a Trainer nobody called prepare_data
            cache.build(self.num_workers, desc=f"caching {split}")
        return cache

    def _cache_for(self, split: str, root: Path | None = None) -> ImageCache:
        """One cache per split holds every image of its folder, whatever the labels say."""
        root = root or self.data_dir
        folder = self.cache_dir if root == self.data_dir else (
            self.cache_dir / default_cache_dir(root).name)
        height, width = self.cache_size
        return ImageCache(split_images(root, split), self.cache_size,
                          folder / f"{split}_{height}x{width}.npy")

    def dataset(self, split: str, preset: str = "none", labelled: bool = True,
                root: Path | None = None, gather_only: bool = False,
                subset: int | None = None) -> DigitImageDataset:
        """One split as a dataset with the given augmentation preset (cached per pair).

        ``labelled=False`` keeps every image of the split, labels or not: prediction must
        write a row for each image, also those whose label is longer than max_len.
        ``root`` reads the split from another folder in the competition layout.
        ``gather_only``: cached images as they are, for augmentation on the device.
        ``subset``: only this many labelled images (see ``train_subset``).
        """
        root = root or self.data_dir
        key = f"{root}:{split}:{preset}:{labelled}:{gather_only}:{subset}"
        if key not in self.datasets:
            if labelled and SPLITS[split][1] is not None:
                files = self._labelled_files(split, root)
                if subset is not None:
                    files = fixed_subset(files, subset)
            else:
                files = SplitFiles(split, split_images(root, split), None)
            cache = self._built_cache(split, root)
            size = self.image_size if preset != "none" else self.eval_size
            self.datasets[key] = DigitImageDataset(files, cache, preset, size,
                                                   self.hparams.max_len,
                                                   self.hparams.box_targets, gather_only,
                                                   self.hparams.char_box_targets)
        return self.datasets[key]

    # -- where augmentation runs ---------------------------------------------------------
    def _device_type(self) -> str:
        """The type of the device the model trains on (before a Trainer: what it would pick)."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    def augments_on_device(self) -> bool:
        """Whether training batches are augmented on the model's device (``augment_on``)."""
        choice = self.hparams.augment_on
        if choice == "auto":
            choice = "device" if self._device_type() != "cpu" else AUTO_ON_CPU
        return choice == "device"

    def _augment_seed(self) -> int:
        """The global seed (``seed_everything``), this process's rank and the epoch."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        epoch = trainer.current_epoch if trainer is not None else 0
        return derive_seed(seed, rank, epoch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Augment training batches on their device (``augment_on: device``)."""
        trainer = self.trainer
        if self.batch_augment is None or trainer is None or not trainer.training:
            return batch
        if self._augment_epoch != trainer.current_epoch:
            self._augment_epoch = trainer.current_epoch
            self.batch_augment.reseed(self._augment_seed())
        boxes = torch.cat([batch["box"][:, None], batch["char_boxes"]], dim=1)
        batch["image"], moved = self.batch_augment(batch["image"], boxes)
        batch["box"], batch["char_boxes"] = moved[:, 0], moved[:, 1:]
        return batch

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            preset = self.hparams.augment
            on_device = self.augments_on_device()
            self.batch_augment = BatchAugment(preset, self.image_size, self._augment_seed()
                                              ) if on_device else None
            subset = self.hparams.train_subset
            own = [self.dataset(s, preset, gather_only=on_device,
                                subset=subset if s == "train" else None)
                   for s in self.hparams.train_on]
            extra = [self.dataset("train", preset, root=root, gather_only=on_device)
                     for root in self.extra_train_dirs]
            self.train_set = TrainingSet(own + extra)
            # What a data-efficiency curve is plotted against (svhn.runs).
            self.training_images = {"data_dir": sum(map(len, own)),
                                    "extra": sum(map(len, extra))}
        if stage in ("fit", "validate", "test", None):
            self.val_set = self.dataset(self.hparams.val_on)
        if stage in ("predict", None):
            self.predict_set = self.dataset(self.hparams.predict_on,
                                            labelled=self.hparams.predict_labelled)

    # -- loaders ------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, sampler=None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_seed_worker_augmentations if workers > 0 else None,
            collate_fn=collate_batch,
            drop_last=False,
        )

    def _eval_sampler(self, dataset: Dataset):
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning's default sampler pads with repeats, which would count some
            # validation images twice; metrics must see each image exactly once.
            return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                rank=trainer.global_rank, shuffle=False)
        return None

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, sampler=self._eval_sampler(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False)
