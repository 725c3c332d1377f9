"""Predict a split with one checkpoint or an ensemble and write the competition's CSV.

``python -m svhn.predict CKPT [CKPT ...] [--data_dir data/mchar] [--split test_a] [--tta]``

The reading itself is ``svhn.inference.predictor.predict_split`` (each checkpoint with its own
settings and precision, views and checkpoints combined, DDP-safe); this module is the
command line: it checks the outputs can be written before any work, writes the CSV (and with
``--save_probs`` the probabilities as ``.npz``) all or none, compares the rows with the sample
submission and prints the score when the split has labels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from svhn.data.labels import BLANK, decode_probabilities, load_labels
from svhn.data.layout import SPLITS, DataError, list_split
from svhn.errors import command, stop_on_sigterm
from svhn.inference.options import add_reader_options, reader_overrides
from svhn.inference.predictions import Predictions
from svhn.inference.predictor import PREDICT_BATCH_SIZE, is_global_zero, predict_split
from svhn.inference.scoring import format_report, score_submission
from svhn.inference.submission import (
    SAMPLE_SUBMISSION,
    build_submission,
    check_writable,
    compare_with_sample,
    read_submission,
    submission_writer,
    write_all_or_none,
)
from svhn.inference.views import PLAIN_VIEWS, TTA_VIEWS
from svhn.paths import DATA_DIR, SUBMIT_DIR
from svhn.run_dir import RunDir
from svhn.tempfiles import refuse_existing

__all__ = ["count_all_blank", "default_output_path", "main", "probs_path_for"]

_SYNTHETIC_TEST_LABELS = "mchar_test_a_labels.json"  # exists only in generated datasets


# -- outputs ---------------------------------------------------------------------------------
def count_all_blank(probs: torch.Tensor) -> int:
    """Images whose most likely class is blank at every position (decoded to one digit)."""
    return int((probs.argmax(dim=-1) == BLANK).all(dim=1).sum())


def default_output_path(checkpoints: Sequence[str | Path], split: str, tta: bool = False,
                        folder: str | Path = SUBMIT_DIR) -> Path:
    """``submit/[<run>_<version>_]<first checkpoint stem>[+<n>more]_<split>[_tta].csv``: a
    checkpoint in a run folder is named with its run, so the ``last.ckpt`` of two runs do
    not write one file."""
    first = Path(checkpoints[0])
    run = RunDir.of_checkpoint(first)
    name = first.stem if run is None else f"{run.name.replace('/', '_')}_{first.stem}"
    if len(checkpoints) > 1:
        name += f"+{len(checkpoints) - 1}more"
    return Path(folder) / f"{name}_{split}{'_tta' if tta else ''}.csv"


def probs_path_for(csv_path: Path) -> Path:
    return csv_path.with_suffix(".npz")


def _probability_arrays(result: Predictions) -> dict[str, np.ndarray]:
    """The answer's probabilities (averaged, or the voted chain's under the zoom search) with
    file names and provenance, for later ensembling."""
    arrays = {
        "file_names": np.asarray(result.file_names),
        "probs": result.probs.numpy().astype(np.float32),
        "checkpoints": np.asarray([str(c) for c in result.checkpoints]),
        "split": np.asarray(result.split),
        "views": np.asarray(list(result.views)),
    }
    if result.boxes is not None:
        arrays["boxes"] = result.boxes.numpy().astype(np.float32)
    return arrays


def _save_npz(arrays: dict[str, np.ndarray]):
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a handle, so numpy does not append ".npz" to tmp
            np.savez(handle, **arrays)
    return write


def _write_outputs(result: Predictions, out: Path, save_probs: bool,
                   overwrite: bool) -> pd.DataFrame:
    """The CSV (and .npz with --save_probs), all or none; prints what was written. Without
    ``overwrite`` a file another process wrote there meanwhile is kept and this run refused."""
    frame = build_submission(result.file_names, decode_probabilities(result.probs))
    writers = {out: submission_writer(frame)}
    if save_probs:
        writers[probs_path_for(out)] = _save_npz(_probability_arrays(result))
    write_all_or_none(writers, overwrite=overwrite)
    blanks = count_all_blank(result.probs)
    if blanks:
        print(f"{blanks} all-blank prediction(s) replaced by their most likely single digit.")
    if result.searched is not None:
        searched = int(result.searched.sum())
        share = searched / max(len(frame), 1)
        print(f"Zoom search on {searched} of {len(frame)} images ({share:.0%}): where the "
              "first two chains were unsure (--full_search: every image).")
    if save_probs:
        print(f"Probabilities: {probs_path_for(out)}")
    print(f"Wrote {out} ({len(frame)} rows).")
    return frame


def _check_against_sample(frame: pd.DataFrame, data_dir: Path) -> None:
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


def _labels_for(data_dir: Path, split: str) -> Path | None:
    """The split's label file, if it has one (test A only in synthetic datasets)."""
    label_name = SPLITS[split][1] or (_SYNTHETIC_TEST_LABELS if split == "test_a" else None)
    path = data_dir / label_name if label_name else None
    return path if path is not None and path.is_file() else None


def _print_score(frame: pd.DataFrame, labels_path: Path) -> None:
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
        description="Predict a split with one or more checkpoints and write the competition "
                    "CSV. An ensemble of checkpoints that run the zoom search answers with one "
                    "vote over all their zoom chains; otherwise it averages their "
                    "per-position probabilities.",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint file(s)")
    parser.add_argument("--data_dir", type=Path, default=DATA_DIR)
    parser.add_argument("--split", default="test_a", choices=sorted(SPLITS))
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default submit/<ckpt-stem>[+<n>more]_<split>[_tta].csv)")
    parser.add_argument("--batch_size", type=int, default=PREDICT_BATCH_SIZE)
    parser.add_argument("--num_workers", type=int, default=None,
                        help="dataloader workers (default 0 on <= 2 cpus, else min(8, cpus - 1))")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=_devices, default=1)
    parser.add_argument("--strategy", default=None, help="e.g. ddp (default: Lightning's auto)")
    reader = add_reader_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--save_probs", action="store_true",
                        help="also write the probabilities as <out>.npz (for ensembling)")
    parser.add_argument("--cache_dir", type=Path, default=None,
                        help="decoded-image cache (default data/cache/<dataset>-<hash>)")
    args = parser.parse_args(argv)
    args.reader_overrides = reader_overrides(args, reader)
    return args


def _check_data(data_dir: Path, split: str) -> None:
    try:
        list_split(data_dir, split)
    except DataError as err:
        raise DataError(f"{err} (or point --data_dir at the competition folder)") from None


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    views = TTA_VIEWS if args.tta else PLAIN_VIEWS
    out = args.out or default_output_path(args.checkpoints, args.split, args.tta)
    outputs = [out, probs_path_for(out)] if args.save_probs else [out]
    check_writable(outputs)
    refuse_existing(outputs, args.overwrite)
    _check_data(args.data_dir, args.split)
    with stop_on_sigterm("prediction stopped; nothing was written."):
        result = predict_split(
            args.checkpoints, args.data_dir, args.split, views=views,
            batch_size=args.batch_size, num_workers=args.num_workers,
            accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
            precision=args.precision, cache_dir=args.cache_dir, **args.reader_overrides,
        )
        if not is_global_zero():
            return 0  # rank 0 holds the same gathered rows and writes them once
        frame = _write_outputs(result, out, args.save_probs, args.overwrite)
    if args.split == "test_a":
        _check_against_sample(frame, args.data_dir)
    labels = _labels_for(args.data_dir, args.split)
    if labels is not None:
        _print_score(frame, labels)
    return 0
