"""Predict a split with one checkpoint or an ensemble and write the competition's CSV.

``python -m svhn.predict CKPT [CKPT ...] [--data_dir data/mchar] [--split test_a] [--tta]``

Each checkpoint is loaded with its own settings (backbone, max_len, and the data module's
image_size / cache_scale stored beside them), predicts through ``lightning.Trainer.predict``
(so ``--devices 2 --strategy ddp`` works: every rank's rows are all-gathered and rank 0 writes
one complete CSV), and the per-position probabilities of all checkpoints and views are
averaged. The CSV has the header ``file_name,file_code`` and one row per image in file-name
order; ``--save_probs`` also keeps the averaged probabilities in an ``.npz`` beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from svhn.data import SPLITS, DataError, SVHNDataModule, list_split
from svhn.labels import BLANK, DEFAULT_MAX_LEN, LabelFileError, decode_probabilities, load_labels
from svhn.module import DigitSequenceModel, normalize_images
from svhn.score import format_report, score_submission
from svhn.submission import (
    SAMPLE_SUBMISSION,
    build_submission,
    compare_with_sample,
    read_submission,
    temporary_path,
    write_submission,
)

DEFAULT_IMAGE_SIZE = (64, 128)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names; 16-mixed: GPUs
SYNTHETIC_TEST_LABELS = "mchar_test_a_labels.json"  # exists only in generated datasets

# -- views (test-time augmentation) ---------------------------------------------------------
View = Callable[[torch.Tensor], torch.Tensor]


def _affine_view(scale: float = 1.0, shift_x: float = 0.0) -> View:
    """Zoom about the centre by ``scale``, move right by ``shift_x`` of the width; the
    border pixels are repeated so no black edges appear (the model never saw any)."""

    def apply(images: torch.Tensor) -> torch.Tensor:
        theta = images.new_tensor([[1 / scale, 0.0, -2 * shift_x], [0.0, 1 / scale, 0.0]])
        grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape),
                             align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    return apply


# Deterministic views of the normalised image batch, all defined here. The first view of a
# list is the one whose box (for models with a box head) is reported.
VIEWS: dict[str, View] = {
    "identity": lambda images: images,
    "shift_left": _affine_view(shift_x=-0.04),
    "shift_right": _affine_view(shift_x=0.04),
    "zoom_in": _affine_view(scale=1.08),
    "zoom_out": _affine_view(scale=0.92),
}
PLAIN_VIEWS = ("identity",)
TTA_VIEWS = tuple(VIEWS)


class ViewAveragingPredictor(L.LightningModule):
    """Runs a model over several views of each batch and averages the probabilities."""

    def __init__(self, model: DigitSequenceModel, views: Sequence[str] = PLAIN_VIEWS):
        super().__init__()
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise ValueError(f"unknown views {unknown}; choose from {sorted(VIEWS)}.")
        self.model = model
        self.views = tuple(views)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        images = normalize_images(batch["image"])  # the views work on float images
        outputs = [self.model.predict_step({**batch, "image": VIEWS[name](images)},
                                           batch_idx) for name in self.views]
        result = {"file_name": outputs[0]["file_name"],
                  "probs": torch.stack([o["probs"] for o in outputs]).mean(dim=0)}
        if "box" in outputs[0]:
            result["box"] = outputs[0]["box"]
        return result


# -- checkpoints ----------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or unlike the others)."""


@dataclass(frozen=True)
class DataSettings:
    """What the data module needs to feed a checkpoint's model the images it was trained on."""

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    cache_scale: float = 1.0
    eval_scale: float = 1.0
    max_len: int = DEFAULT_MAX_LEN


def read_data_settings(checkpoint: str | Path) -> DataSettings:
    """The checkpoint's data settings (Lightning stores the data module's hparams in it)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: cannot read as a checkpoint ({err}).") from None
    data = SVHNDataModule.evaluation_settings(content.get("datamodule_hyper_parameters") or {})
    model = content.get("hyper_parameters") or {}
    size = data.get("image_size", DEFAULT_IMAGE_SIZE)
    return DataSettings(
        image_size=(int(size[0]), int(size[1])),
        cache_scale=float(data.get("cache_scale", 1.0)),
        eval_scale=float(data.get("eval_scale", 1.0)),
        max_len=int(model.get("max_len", data.get("max_len", DEFAULT_MAX_LEN))),
    )


def shared_max_len(settings: Sequence[DataSettings], paths: Sequence[Path]) -> int:
    """Averaging positions needs the same number of them in every model of an ensemble."""
    lengths = {s.max_len for s in settings}
    if len(lengths) > 1:
        listing = ", ".join(f"{p.name}: {s.max_len}" for p, s in zip(paths, settings))
        raise CheckpointError(f"checkpoints disagree on max_len ({listing}); an ensemble "
                              "averages per-position probabilities, so they must match.")
    return lengths.pop()


# -- prediction ------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Per-image outputs in file-name order: probabilities (N, max_len, 11), boxes (N, 4)."""

    file_names: list[str]
    probs: torch.Tensor
    boxes: torch.Tensor | None = None


def _from_batches(batches: Sequence[dict]) -> Predictions:
    names = [name for batch in batches for name in batch["file_name"]]
    probs = torch.cat([b["probs"].cpu() for b in batches]) if batches else torch.empty(0)
    has_boxes = bool(batches) and all("box" in b for b in batches)
    boxes = torch.cat([b["box"].cpu() for b in batches]) if has_boxes else None
    return Predictions(names, probs, boxes)


def _gather_ranks(part: Predictions) -> list[Predictions]:
    """Every rank's predictions, on every rank (one part when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [part]
    # Plain tuples pickle the same in every rank, whatever module name this file runs as.
    parts: list[tuple | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (part.file_names, part.probs, part.boxes))
    return [Predictions(*p) for p in parts if p is not None]


def _merge_sorted(parts: Sequence[Predictions], expected: Sequence[str]) -> Predictions:
    """One Predictions in file-name order; each expected image exactly once (else an error)."""
    parts = [p for p in parts if p.file_names]
    names = [n for p in parts for n in p.file_names]
    if sorted(names) != sorted(expected):
        raise RuntimeError(f"prediction returned {len(names)} rows ({len(set(names))} distinct) "
                           f"for {len(expected)} images; each image must appear exactly once.")
    probs = torch.cat([p.probs for p in parts])
    boxes = None
    if all(p.boxes is not None for p in parts):
        boxes = torch.cat([p.boxes for p in parts])  # type: ignore[misc]
    order = sorted(range(len(names)), key=names.__getitem__)
    return Predictions([names[i] for i in order], probs[order],
                       boxes[order] if boxes is not None else None)


def _average(members: Sequence[Predictions]) -> Predictions:
    """The ensemble: mean probabilities (and boxes, when every member has them)."""
    first = members[0]
    for other in members[1:]:
        if other.file_names != first.file_names:
            raise RuntimeError("ensemble members predicted different images.")
    probs = torch.stack([m.probs for m in members]).mean(dim=0)
    boxes = None
    if all(m.boxes is not None for m in members):
        boxes = torch.stack([m.boxes for m in members]).mean(dim=0)  # type: ignore[misc]
    return Predictions(first.file_names, probs, boxes)


def build_trainer(accelerator: str = "auto", devices: int | str | list[int] = 1,
                  strategy: str | None = None, precision: str = "32-true") -> L.Trainer:
    """A Trainer for prediction only: progress bar on, nothing logged or saved."""
    return L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy or "auto",
                     precision=precision, logger=False, enable_checkpointing=False,
                     enable_model_summary=False)


def build_datamodule(data_dir: str | Path, split: str, settings: DataSettings,
                     batch_size: int, num_workers: int | None,
                     cache_dir: str | Path | None) -> SVHNDataModule:
    """The split as the model saw validation images: same size, cache scale, no augmentation."""
    return SVHNDataModule(
        data_dir=str(data_dir), batch_size=batch_size, num_workers=num_workers,
        augment="none", predict_on=split, cache_dir=str(cache_dir) if cache_dir else None,
        **asdict(settings),
    )


def predict_checkpoint(trainer: L.Trainer, checkpoint: Path, datamodule: SVHNDataModule,
                       views: Sequence[str] = PLAIN_VIEWS,
                       channels_last: bool | None = None) -> Predictions:
    """One checkpoint over the data module's predict split, complete on every rank."""
    model = DigitSequenceModel.load_for_inference(checkpoint, channels_last=channels_last)
    batches = trainer.predict(ViewAveragingPredictor(model, views), datamodule=datamodule,
                              return_predictions=True)
    expected = datamodule.predict_set.names
    return _merge_sorted(_gather_ranks(_from_batches(batches or [])), expected)


def predict_ensemble(
    checkpoint_paths: Sequence[str | Path], data_dir: str | Path, split: str = "test_a", *,
    views: Sequence[str] = PLAIN_VIEWS, batch_size: int = 128, num_workers: int | None = 0,
    accelerator: str = "auto", devices: int | str | list[int] = 1, strategy: str | None = None,
    precision: str = "32-true", channels_last: bool | None = None,
    cache_dir: str | Path | None = None,
) -> Predictions:
    """Average the probabilities of several checkpoints (and views) over a split."""
    paths = [Path(p) for p in checkpoint_paths]
    if not paths:
        raise CheckpointError("no checkpoint given.")
    settings = [read_data_settings(p) for p in paths]
    shared_max_len(settings, paths)
    trainer = build_trainer(accelerator, devices, strategy, precision)
    members = [
        predict_checkpoint(trainer, path,
                           build_datamodule(data_dir, split, s, batch_size, num_workers,
                                            cache_dir), views, channels_last)
        for path, s in zip(paths, settings)
    ]
    return _average(members)


def predict_probabilities(
    checkpoint_paths: Sequence[str | Path], data_dir: str | Path, split: str = "test_a",
    **options: Any,
) -> tuple[list[str], torch.Tensor]:
    """(file names in order, averaged probabilities (N, max_len, 11)); options as
    ``predict_ensemble`` (views, batch_size, num_workers, accelerator, devices, ...)."""
    result = predict_ensemble(checkpoint_paths, data_dir, split, **options)
    return result.file_names, result.probs


def is_global_zero() -> bool:
    """True in the process that writes files (the only one unless distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- outputs ---------------------------------------------------------------------------------
def count_all_blank(probs: torch.Tensor) -> int:
    """Images whose most likely class is blank at every position (decoded to one digit)."""
    return int((probs.argmax(dim=-1) == BLANK).all(dim=1).sum())


def default_output_path(checkpoints: Sequence[str | Path], split: str, tta: bool = False,
                        folder: str | Path = "submit") -> Path:
    """``submit/<first checkpoint stem>[+<n>more]_<split>[_tta].csv``."""
    name = Path(checkpoints[0]).stem
    if len(checkpoints) > 1:
        name += f"+{len(checkpoints) - 1}more"
    return Path(folder) / f"{name}_{split}{'_tta' if tta else ''}.csv"


def probs_path_for(csv_path: Path) -> Path:
    return csv_path.with_suffix(".npz")


def refuse_to_overwrite(paths: Sequence[Path], overwrite: bool) -> None:
    """Existing outputs stay untouched unless the user asked for --overwrite."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it "
                              "or choose another --out.")


def save_probabilities(result: Predictions, path: Path, checkpoints: Sequence[str | Path],
                       split: str, views: Sequence[str]) -> Path:
    """The averaged probabilities with file names and provenance, for later ensembling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "file_names": np.asarray(result.file_names),
        "probs": result.probs.numpy().astype(np.float32),
        "checkpoints": np.asarray([str(c) for c in checkpoints]),
        "split": np.asarray(split),
        "views": np.asarray(list(views)),
    }
    if result.boxes is not None:
        arrays["boxes"] = result.boxes.numpy().astype(np.float32)
    tmp = temporary_path(path)
    try:
        with tmp.open("wb") as handle:  # a handle, so numpy does not append ".npz" to tmp
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_against_sample(frame: pd.DataFrame, data_dir: Path) -> None:
    """Warn (never fail) when the rows differ from the sample submission's names or order."""
    sample_path = data_dir / SAMPLE_SUBMISSION
    if not sample_path.is_file():
        return
    problems = compare_with_sample(frame, read_submission(sample_path))
    if problems:
        print(f"WARNING: the submission differs from {sample_path}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    else:
        print(f"Matches {sample_path.name}: same {len(frame)} file names in the same order.")


def labels_for(data_dir: Path, split: str) -> Path | None:
    """The split's label file, if it has one (test A only in synthetic datasets)."""
    label_name = SPLITS[split][1] or (SYNTHETIC_TEST_LABELS if split == "test_a" else None)
    path = data_dir / label_name if label_name else None
    return path if path is not None and path.is_file() else None


def print_score(frame: pd.DataFrame, labels_path: Path) -> None:
    print(f"Score against {labels_path}:")
    print(format_report(score_submission(frame, load_labels(labels_path))))


# -- command line ----------------------------------------------------------------------------
def _devices(text: str) -> int | str | list[int]:
    """--devices: 2, -1, auto, or a list such as 0,1."""
    if "," in text:
        return [int(d) for d in text.split(",") if d]
    return int(text) if text.lstrip("-").isdigit() else text


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.predict",
        description="Predict a split with one or more checkpoints (an ensemble averages their "
                    "per-position probabilities) and write the competition CSV.",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint file(s)")
    parser.add_argument("--data_dir", type=Path, default=Path("data/mchar"))
    parser.add_argument("--split", default="test_a", choices=sorted(SPLITS))
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default submit/<ckpt-stem>[+<n>more]_<split>[_tta].csv)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=None,
                        help="dataloader workers (default min(8, cpus - 1))")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=_devices, default=1)
    parser.add_argument("--strategy", default=None, help="e.g. ddp (default: Lightning's auto)")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS,
                        help="bf16-mixed: 2-3x faster with --channels_last on CPUs with AMX or "
                             "AVX512-BF16 and on recent GPUs (slower on older CPUs); "
                             "16-mixed: GPUs")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                        help="memory format for the convolutions (default: as trained)")
    parser.add_argument("--tta", action="store_true",
                        help=f"average the views {', '.join(TTA_VIEWS)}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--save_probs", action="store_true",
                        help="also write the probabilities as <out>.npz (for ensembling)")
    parser.add_argument("--cache_dir", type=Path, default=None,
                        help="decoded-image cache (default data/cache/<dataset>-<hash>)")
    return parser.parse_args(argv)


def _check_data(data_dir: Path, split: str) -> None:
    try:
        list_split(data_dir, split)
    except DataError as err:
        raise DataError(f"{err} (or point --data_dir at the competition folder)") from None


def write_outputs(result: Predictions, args: argparse.Namespace, out: Path,
                  views: Sequence[str]) -> pd.DataFrame:
    """The CSV (and .npz with --save_probs); prints what was written."""
    frame = build_submission(result.file_names, decode_probabilities(result.probs))
    write_submission(frame, out)
    blanks = count_all_blank(result.probs)
    if blanks:
        print(f"{blanks} all-blank prediction(s) replaced by their most likely single digit.")
    if args.save_probs:
        npz = save_probabilities(result, probs_path_for(out), args.checkpoints, args.split,
                                 views)
        print(f"Probabilities: {npz}")
    print(f"Wrote {out} ({len(frame)} rows).")
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    views = TTA_VIEWS if args.tta else PLAIN_VIEWS
    out = args.out or default_output_path(args.checkpoints, args.split, args.tta)
    try:
        refuse_to_overwrite([out, probs_path_for(out)] if args.save_probs else [out],
                            args.overwrite)
        _check_data(args.data_dir, args.split)
        result = predict_ensemble(
            args.checkpoints, args.data_dir, args.split, views=views,
            batch_size=args.batch_size, num_workers=args.num_workers,
            accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
            precision=args.precision, channels_last=args.channels_last,
            cache_dir=args.cache_dir,
        )
    except (CheckpointError, DataError, LabelFileError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not is_global_zero():
        return 0  # rank 0 holds the same gathered rows and writes them once
    frame = write_outputs(result, args, out, views)
    if args.split == "test_a":
        check_against_sample(frame, args.data_dir)
    labels = labels_for(args.data_dir, args.split)
    if labels is not None:
        print_score(frame, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
