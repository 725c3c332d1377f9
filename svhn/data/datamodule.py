"""The competition layout as datasets and a LightningDataModule.

Layout under one root: ``mchar_train/`` + ``mchar_train.json``, ``mchar_val/`` +
``mchar_val.json``, ``mchar_test_a/`` (no labels). Images are decoded once into a cache (see
``svhn.data.images``); training augments the small cached uint8 arrays, either per item on the
CPU (albumentations, ``svhn.data.transforms``) or per batch on the model's device
(``svhn.data.batch_augment``), where the loader only gathers cached images and boxes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from svhn.console import framed
from svhn.data.batch_augment import BatchAugment, derive_seed
from svhn.data.datasets import DigitImageDataset, TrainingSet, collate_batch
from svhn.data.folds import (
    FOLD_SPLITS,
    assign_folds,
    check_fold_settings,
    fold_part,
    labelled_keys,
)
from svhn.data.images import DEFAULT_IMAGE_SIZE, ImageCache, default_cache_dir
from svhn.data.labels import (
    DEFAULT_MAX_LEN,
    Sample,
    clip_boxes_to_images,
)
from svhn.data.layout import (
    SPLITS,
    SplitFiles,
    check_layout,
    fixed_subset,
    has_competition_data,
    holds_nothing_of_the_competition,
    is_generated_set,
    list_split,
    split_images,
    split_paths,
)
from svhn.data.transforms import PRESETS
from svhn.data.unlabelled import check_unlabelled_source, unlabelled_files
from svhn.errors import SettingError, at_least
from svhn.paths import DATA_DIR as DEFAULT_DATA_DIR
from svhn.paths import SYNTHETIC_DIR, synthetic_extra_dir
from svhn.tempfiles import held_lock

__all__ = ["AUGMENT_ON", "default_num_workers", "fallback_notice", "scaled_size",
           "SVHNDataModule"]

AUGMENT_ON = ("auto", "cpu", "device")
# What ``augment_on: auto`` picks on a CPU-only run (on an accelerator it is always
# "device"): docs/performance.md has the measurement behind it.
_AUTO_ON_CPU = "device"


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """(height, width) ``size`` times ``scale``: the cache size (``cache_scale``) and the
    evaluation size (``eval_scale``) of a reader's ``image_size``."""
    return round(size[0] * scale), round(size[1] * scale)


def fallback_notice(synthetic_size: int) -> str:
    """The framed notice that training uses the synthetic quick-start set."""
    return framed([
        "NO COMPETITION DATA: training on SYNTHETIC house numbers (the quick start).",
        f"Looked in {DEFAULT_DATA_DIR.resolve()}: nothing there.",
        f"Training on {SYNTHETIC_DIR}/ ({synthetic_size:,} generated training images, made "
        "once).",
        f"Real data: unpack the competition files into {DEFAULT_DATA_DIR}/ (see "
        "data/README.md)",
        "and train configs/real_cpu.yaml on them (the README's real-data recipe).",
    ])


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


def _check_settings(hparams) -> None:
    """Ranges of the data settings, named as the flags are (before any folder is made)."""
    at_least("data.batch_size", hparams.batch_size, 1)
    at_least("data.num_workers", hparams.num_workers, 0, " (None: picked from the cores)")
    at_least("data.max_len", hparams.max_len, 1)
    at_least("data.synthetic_size", hparams.synthetic_size, 1)
    at_least("data.synthetic_extra", hparams.synthetic_extra, 0)
    for name in ("cache_scale", "eval_scale"):
        if not getattr(hparams, name) > 0:
            raise SettingError(f"data.{name} {getattr(hparams, name)!r}: must be above 0.")
    if len(hparams.image_size) != 2 or min(hparams.image_size) < 8:
        raise SettingError(f"data.image_size {list(hparams.image_size)}: must be [height, "
                           "width], each at least 8 pixels.")
    cache_dir = hparams.cache_dir
    if cache_dir and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise SettingError(f"data.cache_dir {cache_dir}: is a file, not a folder. Name a "
                           "folder (made if missing), or leave it unset (data/cache).")


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
            loader), ``device`` (``svhn.data.batch_augment`` on whole batches where the model runs,
            after the copy to it; the loader only gathers cached images) or ``auto``: device
            on an accelerator, and on a CPU-only run whichever docs/performance.md measured faster
            there (``_AUTO_ON_CPU``). Device augmentation draws its random parameters from a
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
        folds: k-fold cross-validation (``svhn.data.folds``): cut every labelled image of
            train and val together into this many folds by one fixed shuffle (its own seed,
            so every fold of a recipe sees the same partition); None (the default): the
            usual train / val split. train_on and val_on stay at their defaults.
        fold: with ``folds``, the fold validated on (0 <= fold < folds); the other folds
            are trained on. One run per fold; ``svhn.runs`` shows their mean and spread.
        unlabelled: images without labels to learn from (``svhn.data.unlabelled``): a split
            of data_dir (``test_a``) or a folder of images; never the split validated on.
            The ``pseudo_labels`` rounds of ``svhn.fit`` read them with the model being
            trained, which then trains on its confident readings too.
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
        folds: int | None = None,
        fold: int | None = None,
        unlabelled: str | None = None,
    ):
        super().__init__()
        if augment not in PRESETS:  # here, not at setup: a refused run must write nothing
            raise SettingError(f"augment {augment!r}: choose one of {PRESETS}.")
        check_fold_settings(folds, fold, train_on, val_on, train_subset)
        self.save_hyperparameters()
        if train_subset is not None and train_subset < 1:
            raise SettingError(f"train_subset must be a number of images >= 1, not "
                             f"{train_subset} (None: the whole train split).")
        if augment_on not in AUGMENT_ON:
            raise SettingError(f"augment_on must be one of {AUGMENT_ON}, not {augment_on!r}.")
        _check_settings(self.hparams)
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
        self._folds_of: dict[tuple[str, str], int] | None = None  # with folds: image -> fold
        self._augment_epoch: int | None = None
        self.extra_train_dirs = [Path(d) for d in extra_train]
        if synthetic_extra > 0:
            self.extra_train_dirs.append(synthetic_extra_dir(synthetic_extra))
        check_unlabelled_source(unlabelled, self.data_dir, train_on, val_on, folds)
        self._labelled_sets: list[Dataset] = []  # set by setup("fit"): what train_set holds
        self._synthetic_set: Dataset | None = None  # ... of which the synthetic_extra set
        self.pseudo_labelled: list[Sample] = []  # set by set_pseudo_labels

    def _scaled(self, scale: float) -> tuple[int, int]:
        return scaled_size(self.image_size, scale)

    @staticmethod
    def evaluation_settings(hparams: dict) -> dict:
        """The data settings (from a checkpoint's datamodule hparams) that decide what the
        model is fed at evaluation, so prediction feeds it the same."""
        keys = ("image_size", "cache_scale", "eval_scale", "max_len")
        return {k: hparams[k] for k in keys if k in hparams}

    # -- data on disk -------------------------------------------------------------------
    def _synthetic_needed(self) -> bool:
        """The fallback set (``uses_synthetic_fallback``) is generated once and reused while
        its size matches."""
        if not has_competition_data(self.data_dir):
            return True
        return len(list((self.data_dir / "mchar_train").glob("*.png"))) != \
            self.hparams.synthetic_size

    def prepare_data(self) -> None:
        """Runs once per machine, before anything is trained or written: generate synthetic
        sets, check the layout, labels and boxes, decode images into the caches."""
        from svhn.data.synthetic import generate_dataset

        # Two fits started together (seeds side by side) would write one set at once: the
        # second waits for the first, then finds the set made.
        if self.uses_synthetic_fallback:
            with held_lock(self.data_dir):
                if self._synthetic_needed():
                    generate_dataset(self.data_dir, n_train=self.hparams.synthetic_size,
                                     seed=0)
        stage = self.trainer.state.fn if self.trainer is not None else None
        labelled, unlabelled = self._splits_in_use(stage)
        check_layout(self.data_dir, labelled)  # the user's data first: a mistyped folder
        check_layout(self.data_dir, unlabelled, labelled=False)  # generates nothing
        extra = self.hparams.synthetic_extra
        if extra > 0 and stage in (None, "fit"):
            with held_lock(self.extra_train_dirs[-1]):
                if not has_competition_data(self.extra_train_dirs[-1]):
                    # Seed 1: never the same images as the seed-0 fallback set.
                    generate_dataset(self.extra_train_dirs[-1], n_train=extra, n_val=1,
                                     n_test=1, seed=1, progress=True)
        extra = self.extra_train_dirs if stage in (None, "fit") else []
        for root in extra:
            check_layout(root, ["train"])
        sources = [(self.data_dir, split) for split in labelled] + [(root, "train")
                                                                   for root in extra]
        for root, split in sources:  # every label file read and checked before any decoding
            self._listed(split, root)
        if self.hparams.folds is not None:
            self._fold_assignment()  # too few images for the folds: refused before decoding
        for root, split in sources:
            self._labelled_files(split, root)
        for split in unlabelled:
            self._built_cache(split, self.data_dir)
        if self.hparams.unlabelled is not None and stage in (None, "fit"):
            self._unlabelled_cache().build(self.num_workers, desc="caching unlabelled")

    def _splits_in_use(self, stage: str | None) -> tuple[list[str], list[str]]:
        """(labelled, unlabelled) splits a stage reads: training and validation splits must
        exist with their labels; the predict split is read (and cached) for prediction
        only, and, with no stage named, if present (everything a later stage may read).
        A fit does not decode test A for nothing: --data.unlabelled is its own cache."""
        predict_on = self.hparams.predict_on
        if stage == "predict":
            return [], [predict_on]
        labelled = list(dict.fromkeys([*self.hparams.train_on, self.hparams.val_on]))
        if self.hparams.folds is not None:
            labelled = list(FOLD_SPLITS)
        if stage is not None:
            return labelled, []
        present = split_paths(self.data_dir, predict_on)[0].is_dir()
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
            label_file = split_paths(root, split)[1]
            samples = clip_boxes_to_images(files.samples, sizes, str(label_file))
            self._checked_files[key] = SplitFiles(split, files.image_paths, samples)
        return self._checked_files[key]

    def _fold_assignment(self) -> dict[tuple[str, str], int]:
        """With ``folds``: the fold of every labelled (split, file name) of train and val."""
        if self._folds_of is None:
            self._folds_of = assign_folds(labelled_keys(self.data_dir), self.hparams.folds)
        return self._folds_of

    def fold_files(self, split: str, held_out: bool) -> SplitFiles:
        """With ``folds``: the labelled images of ``split`` (train or val) in the held-out
        fold (``held_out``) or in the folds trained on."""
        files = self._labelled_files(split, self.data_dir)
        return fold_part(files, self._fold_assignment(), self.hparams.fold, held_out)

    def training_data(self) -> dict:
        """What this module trains on, as ``run_summary.json`` and its checkpoints record it:
        the data folder (resolved), whether it is a synthetic set (the quick start's
        fallback or one ``svhn.synthetic`` generated) and the extra training folders."""
        record = {"data_dir": str(self.data_dir.resolve()),
                  "synthetic": bool(self.uses_synthetic_fallback
                                    or is_generated_set(self.data_dir)),
                  "fallback": bool(self.uses_synthetic_fallback),
                  "extra_train": [str(d.resolve()) for d in self.extra_train_dirs]}
        if self.hparams.get("unlabelled") is not None:
            files = self._unlabelled_files()
            record["unlabelled"] = {"source": self.hparams.unlabelled,
                                    "folder": str(files.image_paths[0].parent.resolve()),
                                    "images": len(files.image_paths)}
        return record

    def state_dict(self) -> dict:
        """Saved in every checkpoint of a fit (under ``SVHNDataModule``): what it was
        trained on (``training_data``), so a later reader can say so."""
        return {"trained_on": self.training_data()}

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

    # -- images without labels -----------------------------------------------------------
    def _unlabelled_files(self) -> SplitFiles:
        key = f"unlabelled:{self.hparams.unlabelled}"
        if key not in self._listed_files:
            self._listed_files[key] = unlabelled_files(self.data_dir, self.hparams.unlabelled)
        return self._listed_files[key]

    def _unlabelled_cache(self) -> ImageCache:
        source = self.hparams.unlabelled
        if source in SPLITS:
            return self._cache_for(source)
        folder = self._unlabelled_files().image_paths[0].parent
        height, width = self.cache_size
        return ImageCache(self._unlabelled_files().image_paths, self.cache_size,
                          self.cache_dir / default_cache_dir(folder).name
                          / f"images_{height}x{width}.npy")

    def unlabelled_set(self) -> DigitImageDataset:
        """The unlabelled images as evaluation reads them (no augmentation, eval_scale):
        what a teacher reads to pseudo-label them."""
        key = f"unlabelled:{self.hparams.unlabelled}:eval"
        if key not in self.datasets:
            cache = self._unlabelled_cache()
            if not cache.is_fresh():
                cache.build(self.num_workers, desc="caching unlabelled")
            self.datasets[key] = DigitImageDataset(
                self._unlabelled_files(), cache, "none", self.eval_size,
                max_len=self.hparams.max_len)
        return self.datasets[key]

    def training_images_text(self) -> str:
        """What a fit trains on, real and generated apart: ``2,000 labelled images of
        data/mchar + 4,000 generated (data.synthetic_extra)``."""
        counts = self.training_images or {}
        where = "the synthetic quick-start set" if self.uses_synthetic_fallback else \
            str(self.data_dir)
        parts = [f"{counts.get('data_dir', 0):,} labelled images of {where}"]
        synthetic = counts.get("synthetic", 0)
        other = counts.get("extra", 0) - synthetic
        if other:
            parts.append(f"{other:,} of the extra_train folders")
        if synthetic:
            dropped = " until the first pseudo-labels took their place" \
                if self.pseudo_labelled and self._synthetic_set is not None \
                and self._synthetic_set not in self.train_set.datasets else ""
            parts.append(f"{synthetic:,} generated (data.synthetic_extra){dropped}")
        if counts.get("pseudo_labelled"):
            parts.append(f"{counts['pseudo_labelled']:,} pseudo-labelled of "
                         f"{self.hparams.unlabelled}")
        return " + ".join(parts)

    def set_pseudo_labels(self, samples: list[Sample], drop_synthetic: bool = False) -> None:
        """Train on these pseudo-labelled images (of ``unlabelled_set``) too, from the next
        train loader on; they replace any earlier ones. ``drop_synthetic``: they also take
        the place of the ``synthetic_extra`` images."""
        files = self._unlabelled_files()
        by_name = {path.name: path for path in files.image_paths}
        unknown = [s.file_name for s in samples if s.file_name not in by_name]
        if unknown:
            raise ValueError(f"pseudo-labels for images not in {files.name}: {unknown[:3]}")
        self.pseudo_labelled = list(samples)
        labelled = [part for part in self._labelled_sets
                    if not (samples and drop_synthetic and part is self._synthetic_set)]
        if self.training_images is not None:
            self.training_images["pseudo_labelled"] = len(samples)
        if not samples:
            self.train_set = TrainingSet(labelled)
            return
        pseudo = DigitImageDataset(
            SplitFiles(files.name, [by_name[s.file_name] for s in samples], list(samples)),
            self.unlabelled_set().cache, self.hparams.augment, self.image_size,
            max_len=self.hparams.max_len, box_targets=self.hparams.box_targets,
            gather_only=self.batch_augment is not None,
            char_box_targets=self.hparams.char_box_targets)
        self.train_set = TrainingSet([*labelled, pseudo])

    def dataset(self, split: str, preset: str = "none", labelled: bool = True,
                root: Path | None = None, gather_only: bool = False,
                subset: int | None = None, fold_part: str | None = None
                ) -> DigitImageDataset:
        """One split as a dataset with the given augmentation preset (cached per pair).

        ``labelled=False`` keeps every image of the split, labels or not: prediction must
        write a row for each image, also those whose label is longer than max_len.
        ``root`` reads the split from another folder in the competition layout.
        ``gather_only``: cached images as they are, for augmentation on the device.
        ``subset``: only this many labelled images (see ``train_subset``).
        ``fold_part``: with ``folds``, only the images of the held-out fold (``held_out``)
        or of the folds trained on (``train``).
        """
        root = root or self.data_dir
        key = f"{root}:{split}:{preset}:{labelled}:{gather_only}:{subset}:{fold_part}"
        if key not in self.datasets:
            if fold_part is not None:
                files = self.fold_files(split, held_out=fold_part == "held_out")
            elif labelled and SPLITS[split][1] is not None:
                files = self._labelled_files(split, root)
                if subset is not None:
                    files = fixed_subset(files, subset)
            else:
                files = SplitFiles(split, split_images(root, split), None)
            cache = self._built_cache(split, root)
            size = self.image_size if preset != "none" else self.eval_size
            self.datasets[key] = DigitImageDataset(
                files, cache, preset, size, max_len=self.hparams.max_len,
                box_targets=self.hparams.box_targets, gather_only=gather_only,
                char_box_targets=self.hparams.char_box_targets)
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
            choice = "device" if self._device_type() != "cpu" else _AUTO_ON_CPU
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
            if self.hparams.folds is not None:  # the folds trained on, of train and val
                own = [self.dataset(s, preset, gather_only=on_device, fold_part="train")
                       for s in FOLD_SPLITS if self.fold_files(s, held_out=False).image_paths]
            else:
                own = [self.dataset(s, preset, gather_only=on_device,
                                    subset=subset if s == "train" else None)
                       for s in self.hparams.train_on]
            extra = [self.dataset("train", preset, root=root, gather_only=on_device)
                     for root in self.extra_train_dirs]
            self.train_set = TrainingSet(own + extra)
            # What a data-efficiency curve is plotted against (svhn.runs).
            self.training_images = {"data_dir": sum(map(len, own)),
                                    "extra": sum(map(len, extra))}
            self._labelled_sets = own + extra
            self._synthetic_set = extra[-1] if self.hparams.synthetic_extra > 0 else None
            self.training_images["synthetic"] = len(self._synthetic_set or ())
            if self.hparams.get("unlabelled") is not None:
                self.training_images["unlabelled"] = len(self._unlabelled_files().image_paths)
        if stage in ("fit", "validate", "test", None):
            self.val_set = self._held_out_fold() if self.hparams.folds is not None else \
                self.dataset(self.hparams.val_on)
        if stage in ("predict", None):
            self.predict_set = self.dataset(self.hparams.predict_on,
                                            labelled=self.hparams.predict_labelled)

    def _held_out_fold(self) -> Dataset:
        """The held-out fold's images of train and val, validated on as one set."""
        parts = [self.dataset(s, fold_part="held_out") for s in FOLD_SPLITS
                 if self.fold_files(s, held_out=True).image_paths]
        if not parts:
            raise SettingError(f"--data.fold {self.hparams.fold} of --data.folds "
                               f"{self.hparams.folds}: no image of this fold has a label of "
                               f"at most max_len={self.hparams.max_len} digits; choose fewer "
                               "folds.")
        return parts[0] if len(parts) == 1 else TrainingSet(parts)

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
