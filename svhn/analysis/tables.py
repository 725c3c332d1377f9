"""Tables for looking at the data and at a model's predictions (used by notebooks and report).

Data side: one row per labelled image (label, length, image size, the union box of the digits
in pixels and as fractions of the image), example images with their boxes, and what the
training augmentations make of a few images.

Prediction side: a checkpoint's per-position probabilities on a labelled split, and the tables
the error analysis shows: score, character accuracy, accuracy by label length and by position,
the digit confusion matrix (blank included), the most confident mistakes, and training curves
from the run's ``metrics.csv``.

Accuracies follow ``svhn.model.metrics`` exactly, so the numbers here match the
``val/seq_acc`` and ``val/position_acc`` logged during training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from svhn.checkpoint_format import CheckpointContents
from svhn.data.datasets import DigitImageDataset
from svhn.data.images import DEFAULT_IMAGE_SIZE, ImageCache, read_rgb
from svhn.data.labels import (
    BLANK,
    DEFAULT_MAX_LEN,
    NUM_CLASSES,
    canonical_predictions,
    decode_label,
    decode_probabilities,
)
from svhn.data.layout import SPLITS, SplitFiles, list_split
from svhn.errors import SettingError
from svhn.inference import predictor
from svhn.inference.predictions import Predictions
from svhn.model.metrics import whole_string_correct
from svhn.model.vote import chain_confidence
from svhn.run_dir import RunDir

__all__ = ["accuracy_by_length", "accuracy_by_position", "AUGMENT_PRESETS",
           "augmentation_draws", "AugmentedExample", "Box", "CLASS_NAMES",
           "confident_mistakes", "confusion_frame", "confusion_matrix", "digit_accuracy",
           "digit_counts", "digit_position_counts", "epoch_end_step", "Example", "image_sizes",
           "LABELLED_SPLITS", "length_counts", "load_examples", "metric_curve", "Mistake",
           "position_accuracy", "predict_labelled", "prediction_table", "read_metrics",
           "run_dir_of", "sample_table", "sequence_accuracy", "split_counts", "summary"]

CLASS_NAMES = [str(d) for d in range(10)] + ["blank"]
LABELLED_SPLITS = ("train", "val")
AUGMENT_PRESETS = ("baseline", "strong", "zoom")

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------- data tables


def split_counts(data_dir: str | Path) -> pd.DataFrame:
    """Images and labels per split present under ``data_dir``."""
    rows = []
    for split, (folder, _labels) in SPLITS.items():
        if not (Path(data_dir) / folder).is_dir():
            continue
        files = list_split(data_dir, split)
        labels = len(files.samples) if files.samples is not None else 0
        rows.append({"split": split, "images": len(files.image_paths), "labels": labels})
    return pd.DataFrame(rows, columns=["split", "images", "labels"])


def image_sizes(paths: Sequence[Path]) -> np.ndarray:
    """(N, 2) width, height of each image, read from the file headers (no decoding)."""
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            sizes[i] = img.size
    return sizes


def sample_table(data_dir: str | Path, splits: Sequence[str] = LABELLED_SPLITS) -> pd.DataFrame:
    """One row per labelled image: label, size, union box in pixels and relative to the image.

    Columns: split, file_name, label, length, width, height, x0, y0, x1, y1 (union box,
    pixels), box_w, box_h (union box size / image size), box_cx, box_cy (box centre / image
    size) and digit_h (mean digit box height, pixels). Labels of every length are kept.
    """
    frames = []
    for split in splits:
        files = list_split(data_dir, split)
        if files.samples is None:
            raise SettingError(f"split {split!r} has no labels; choose from {LABELLED_SPLITS}.")
        sizes = image_sizes(files.image_paths)
        union = np.array([s.union_box() for s in files.samples], dtype=np.float64)
        frame = pd.DataFrame({
            "split": split,
            "file_name": [s.file_name for s in files.samples],
            "label": [s.label for s in files.samples],
            "length": [len(s.digits) for s in files.samples],
            "width": sizes[:, 0],
            "height": sizes[:, 1],
            "x0": union[:, 0], "y0": union[:, 1], "x1": union[:, 2], "y1": union[:, 3],
            "digit_h": [float(np.mean([b[3] for b in s.boxes])) for s in files.samples],
        })
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table["box_w"] = (table.x1 - table.x0) / table.width
    table["box_h"] = (table.y1 - table.y0) / table.height
    table["box_cx"] = (table.x0 + table.x1) / 2 / table.width
    table["box_cy"] = (table.y0 + table.y1) / 2 / table.height
    return table


def length_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per label length (rows) and split (columns)."""
    return pd.crosstab(table["length"], table["split"]).rename_axis(index="length", columns=None)


def digit_counts(table: pd.DataFrame) -> pd.DataFrame:
    """How often each digit 0-9 (rows) occurs in the labels of each split (columns)."""
    digits = table[["split", "label"]].assign(digit=table["label"].map(list)).explode("digit")
    counts = pd.crosstab(digits["digit"].astype(int), digits["split"])
    return counts.reindex(range(10), fill_value=0).rename_axis(index="digit", columns=None)


def digit_position_counts(table: pd.DataFrame) -> pd.DataFrame:
    """How often each digit (rows) stands at each position from the left (columns, 1-based)."""
    longest = int(table["length"].max())
    counts = np.zeros((10, longest), dtype=np.int64)
    for label in table["label"]:
        for position, char in enumerate(label):
            counts[int(char), position] += 1
    return pd.DataFrame(counts, index=pd.Index(range(10), name="digit"),
                        columns=pd.Index(range(1, longest + 1), name="position"))


# --------------------------------------------------------------------------- example images


@dataclass
class Example:
    """One labelled image as stored on disk, with per-digit boxes (left, top, width, height)."""

    file_name: str
    label: str
    image: np.ndarray  # H, W, 3 uint8
    boxes: tuple[Box, ...]


def _pick_file_names(data_dir: str | Path, split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` file names of a labelled split drawn at random (reproducible with ``seed``)."""
    files = list_split(data_dir, split, DEFAULT_MAX_LEN)
    names = [p.name for p in files.image_paths]
    chosen = np.random.default_rng(seed).choice(len(names), size=min(n, len(names)),
                                                replace=False)
    return [names[i] for i in sorted(chosen)]


def load_examples(data_dir: str | Path, split: str = "train", n: int = 16, seed: int = 0,
                  file_names: Sequence[str] | None = None) -> list[Example]:
    """Original images with labels and boxes: the given files, else ``n`` random ones."""
    files = list_split(data_dir, split)
    if files.samples is None:
        raise SettingError(f"split {split!r} has no labels to draw.")
    wanted = list(file_names) if file_names is not None else _pick_file_names(
        data_dir, split, n, seed)
    by_name = {p.name: (p, s) for p, s in zip(files.image_paths, files.samples)}
    return [Example(name, by_name[name][1].label, read_rgb(by_name[name][0]),
                    by_name[name][1].boxes) for name in wanted]


@dataclass
class AugmentedExample:
    """One image after the ``none`` preset and several draws of each training preset.

    Images are (H, W, 3) uint8 at the model's input size; boxes are the union box of the
    digits as it comes out of the transform, normalised (x0, y0, x1, y1).
    """

    file_name: str
    label: str
    original: tuple[np.ndarray, Box]
    draws: dict[str, list[tuple[np.ndarray, Box]]]


def _to_display_image(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) model input as the data module sends it (uint8) -> (H, W, 3) picture."""
    return image.to(torch.uint8).permute(1, 2, 0).numpy()


def _example_subset(data_dir: str | Path, split: str, file_names: Sequence[str]) -> SplitFiles:
    files = list_split(data_dir, split, DEFAULT_MAX_LEN)
    index = {p.name: i for i, p in enumerate(files.image_paths)}
    chosen = [index[name] for name in file_names]
    return SplitFiles(split, [files.image_paths[i] for i in chosen],
                      [files.samples[i] for i in chosen])


def _draw(dataset: DigitImageDataset, index: int) -> tuple[np.ndarray, Box]:
    item = dataset[index]
    return _to_display_image(item["image"]), tuple(float(v) for v in item["box"])


def augmentation_draws(
    data_dir: str | Path,
    cache_dir: str | Path,
    split: str = "train",
    file_names: Sequence[str] | None = None,
    n_images: int = 3,
    presets: Sequence[str] = AUGMENT_PRESETS,
    n_draws: int = 4,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> list[AugmentedExample]:
    """Run a few images through the training datasets of each preset, several times each.

    Uses the same ``DigitImageDataset`` as training, over a small cache of just these images
    (so the whole split is not decoded for a handful of pictures).
    """
    names = list(file_names) if file_names is not None else _pick_file_names(
        data_dir, split, n_images, seed)
    files = _example_subset(data_dir, split, names)
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:10]
    height, width = image_size
    cache = ImageCache(files.image_paths, image_size,
                       Path(cache_dir) / f"examples_{split}_{digest}_{height}x{width}.npy")
    cache.build()
    plain = DigitImageDataset(files, cache, preset="none", image_size=image_size)
    examples = []
    for i, sample in enumerate(files.samples):
        examples.append(AugmentedExample(sample.file_name, sample.label, _draw(plain, i), {}))
    for preset in presets:
        dataset = DigitImageDataset(files, cache, preset=preset, image_size=image_size)
        dataset.transform.set_random_seed(seed)
        for i, example in enumerate(examples):
            example.draws[preset] = [_draw(dataset, i) for _ in range(n_draws)]
    return examples


# --------------------------------------------------------------------------- predictions


def _accelerator(device: str | None) -> str:
    return "auto" if device is None else {"cuda": "gpu"}.get(device, device)


def predict_labelled(
    checkpoint: str | Path | CheckpointContents,
    data_dir: str | Path,
    split: str = "val",
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | None = None,
) -> Predictions:
    """Probabilities and targets of ``checkpoint`` on every labelled image of a split, read
    through ``svhn.inference`` exactly as ``svhn.predict`` reads (same sizes, scale and
    precision as validation), so the scores here match the logged ``val/seq_acc``."""
    if SPLITS[split][1] is None:
        raise SettingError(f"split {split!r} has no labels; error analysis needs train or val.")
    return predictor.predict_split([checkpoint], data_dir, split, batch_size=batch_size,
                                   num_workers=num_workers, cache_dir=cache_dir,
                                   accelerator=_accelerator(device), labelled=True)


# --------------------------------------------------------------------------- scores


def sequence_accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The competition score: share of images whose whole submitted string is right."""
    return float(whole_string_correct(probs, targets).mean())


def position_accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of all max_len positions (blanks included) whose argmax class is right."""
    return float((probs.argmax(-1) == targets).float().mean())


def digit_accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of positions holding a digit whose argmax class is that digit."""
    has_digit = targets != BLANK
    return float((probs.argmax(-1) == targets)[has_digit].float().mean())


def summary(pred: Predictions) -> dict[str, object]:
    """The headline numbers of an error analysis."""
    return {
        "checkpoint": str(pred.checkpoint),
        "data_dir": str(pred.data_dir),
        "split": pred.split,
        "images": len(pred),
        "score": sequence_accuracy(pred.probs, pred.targets),
        "position_acc": position_accuracy(pred.probs, pred.targets),
        "digit_acc": digit_accuracy(pred.probs, pred.targets),
    }


def prediction_table(pred: Predictions) -> pd.DataFrame:
    """One row per image: truth, prediction, correct, length, confidence.

    ``confidence`` is the probability the model gives its own per-position reading (the
    product of each position's top probability).
    """
    right = (canonical_predictions(pred.probs) == pred.targets).all(dim=1)
    return pd.DataFrame({
        "file_name": pred.file_names,
        "truth": [decode_label(row.tolist()) for row in pred.targets],
        "prediction": decode_probabilities(pred.probs),
        "correct": right.numpy(),
        "length": (pred.targets != BLANK).sum(dim=1).numpy(),
        "confidence": chain_confidence(pred.probs).numpy(),
    })


def accuracy_by_length(table: pd.DataFrame) -> pd.DataFrame:
    """Images and whole-string accuracy per label length (from ``prediction_table``)."""
    grouped = table.groupby("length")["correct"]
    return pd.DataFrame({"images": grouped.size(), "accuracy": grouped.mean()}).reset_index()


def accuracy_by_position(probs: torch.Tensor, targets: torch.Tensor) -> pd.DataFrame:
    """Per position (1 = leftmost): accuracy over all images, and over those with a digit there.

    Columns: position, accuracy, digit_slots (images with a digit there), digit_accuracy
    (NaN where no image has that many digits).
    """
    right = probs.argmax(-1) == targets
    has_digit = targets != BLANK
    slots = has_digit.sum(dim=0)
    digit_right = (right & has_digit).sum(dim=0)
    digit_acc = torch.where(slots > 0, digit_right / slots.clamp(min=1), torch.nan)
    return pd.DataFrame({
        "position": range(1, targets.shape[1] + 1),
        "accuracy": right.float().mean(dim=0).numpy(),
        "digit_slots": slots.numpy(),
        "digit_accuracy": digit_acc.numpy(),
    })


def confusion_matrix(probs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(11, 11) counts over every position: rows the true class, columns the argmax class.

    Index 10 is the blank. The counts sum to images * max_len.
    """
    predicted = probs.argmax(-1).flatten().numpy()
    truth = targets.flatten().numpy()
    pairs = np.bincount(truth * NUM_CLASSES + predicted, minlength=NUM_CLASSES ** 2)
    return pairs.reshape(NUM_CLASSES, NUM_CLASSES)


def confusion_frame(matrix: np.ndarray) -> pd.DataFrame:
    """The confusion matrix with class names (``blank`` for class 10) on both axes."""
    return pd.DataFrame(matrix, index=pd.Index(CLASS_NAMES, name="true"),
                        columns=pd.Index(CLASS_NAMES, name="predicted"))


@dataclass
class Mistake:
    """A wrongly read image with what the model thought, position by position."""

    file_name: str
    image: np.ndarray  # H, W, 3 uint8, as on disk
    truth: str
    prediction: str
    confidence: float
    probs: np.ndarray  # (max_len, 11)
    target: np.ndarray  # (max_len,)


def confident_mistakes(pred: Predictions, n: int = 12) -> list[Mistake]:
    """The ``n`` wrong images the model was most sure about, most confident first."""
    table = prediction_table(pred)
    wrong = table[~table["correct"]].sort_values("confidence", ascending=False).head(n)
    return [
        Mistake(row.file_name, read_rgb(pred.image_paths[i]), row.truth, row.prediction,
                float(row.confidence), pred.probs[i].numpy(), pred.targets[i].numpy())
        for i, row in zip(wrong.index, wrong.itertuples())
    ]


# --------------------------------------------------------------------------- training curves


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder of a checkpoint saved by svhn.fit (``<run>/checkpoints/x.ckpt``);
    None for a checkpoint kept elsewhere."""
    run = RunDir.of_checkpoint(checkpoint)
    return None if run is None else run.path


def read_metrics(run_dir: str | Path | None) -> pd.DataFrame | None:
    """The run's ``metrics.csv`` (CSVLogger), or None when there is no run or it has none."""
    if run_dir is None:
        return None
    path = RunDir(Path(run_dir)).metrics
    return pd.read_csv(path) if path.is_file() else None


def epoch_end_step(metrics: pd.DataFrame, epoch: int | None) -> float | None:
    """The step at which ``epoch`` was validated (where its checkpoint was taken), if logged."""
    if epoch is None or "epoch" not in metrics or "step" not in metrics:
        return None
    validated = metrics[(metrics["epoch"] == epoch) & metrics.filter(like="val/").notna().any(
        axis=1)]
    return float(validated["step"].max()) if not validated.empty else None


def metric_curve(metrics: pd.DataFrame, column: str, x: str = "step") -> pd.DataFrame:
    """``x`` and ``column`` where ``column`` was logged (CSV rows are sparse per metric)."""
    if column not in metrics or x not in metrics:
        return pd.DataFrame({x: [], column: []})
    curve = metrics[[x, column]].dropna()
    # A resumed run can log the same step twice; the later value is the one that counts.
    return curve.drop_duplicates(subset=x, keep="last").reset_index(drop=True)
