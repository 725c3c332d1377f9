"""A run's own record, ``run_summary.json`` beside its ``config.yaml``, and its result.

``svhn.fit`` adds ``svhn.train.callbacks.RunSummaryWriter`` to every fit. It writes the recipe
(the ``--config`` chain as given; none: the quick start, ``configs/default.yaml``), which splits
were trained on and whether the validation split was held out, and one entry per fit
session (a resumed run adds one) with its training time and how it ended. ``svhn.runs``
reads it back. The time runs from ``on_fit_start`` to the end of the fit: data caching and
start-up are not in it.

A cross-validation run (``--data.folds K --data.fold i``) records ``folds`` and ``fold``; it
trains on the other folds of train and val (``train_on: [train, val]``) and its fold is held
out. Every fit records ``data`` (``SVHNDataModule.training_data``: the data folder, whether
it is synthetic) and, at its end, ``val_seq_acc``: the score of its result checkpoint.

``final_checkpoint`` is the one rule for which checkpoint is a run's result: the best by
``val/seq_acc`` when the validation images were held out, otherwise ``last.ckpt`` (a
checkpoint picked on images the model trained on would be picked on a score that says
nothing about unseen images). This module imports no Lightning, so ``svhn.runs`` starts fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svhn.errors import SettingError
from svhn.run_dir import RunDir

__all__ = ["final_checkpoint", "LAST_CHECKPOINT", "last_checkpoint_path",
           "not_held_out_message", "read_run_summary", "recorded_seconds", "RUN_SUMMARY_FILE",
           "TrainingData", "training_data_from_record", "val_is_held_out", "write_run_summary"]

RUN_SUMMARY_FILE = RunDir.SUMMARY
LAST_CHECKPOINT = RunDir.LAST


def val_is_held_out(train_on: Any, val_on: Any, fold: Any = None) -> bool:
    """False when the validation split is one of the training splits. A cross-validation
    fold (``fold`` set: ``--data.folds``) is always held out: its images are cut out of the
    splits trained on."""
    if fold is not None:
        return True
    splits = [train_on] if isinstance(train_on, str) else list(train_on or ())
    return str(val_on) not in {str(s) for s in splits}


def not_held_out_message(train_on: Any, val_on: Any) -> str:
    splits = ", ".join(str(s) for s in ([train_on] if isinstance(train_on, str) else train_on))
    return (f"Validation split '{val_on}' is also trained on (train_on: [{splits}]): "
            f"val/seq_acc is NOT a held-out score. The run's result is {LAST_CHECKPOINT} "
            f"(the last epoch), not the checkpoint with the best val/seq_acc; choose max_epochs "
            f"on a run that holds val out first.")


def last_checkpoint_path(trainer) -> str:
    """The checkpoint of the last epoch: the ModelCheckpoint without a monitor."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", "") is None and getattr(callback, "best_model_path", ""):
            return callback.best_model_path
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        path = Path(callback.dirpath) / LAST_CHECKPOINT
        if path.is_file():
            return str(path)
    return ""


def final_checkpoint(trainer, held_out: bool) -> tuple[str, str]:
    """(path, why) of the checkpoint a fit hands on to ``svhn.predict``."""
    callback = trainer.checkpoint_callback
    last = last_checkpoint_path(trainer)
    if not held_out:
        return last, "last epoch: validation images were trained on"
    best = callback.best_model_path if callback is not None else ""
    if best:
        return best, "best val/seq_acc"
    return last, "last epoch: no best checkpoint"


def read_run_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``run_summary.json``, or None when it has none; ValueError if unreadable."""
    path = Path(run_dir) / RUN_SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SettingError(f"{RUN_SUMMARY_FILE} unreadable ({err})") from None
    if not isinstance(summary, dict):
        raise SettingError(f"{RUN_SUMMARY_FILE} is not a JSON object")
    return summary


def recorded_seconds(summary: dict[str, Any]) -> float:
    """Training seconds of the sessions that recorded their end."""
    return float(sum(s.get("seconds") or 0.0 for s in summary.get("sessions", [])))


def write_run_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """Replaces the run's ``run_summary.json`` in one step (never half written)."""
    path = Path(run_dir) / RUN_SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    partial.replace(path)


@dataclass(frozen=True)
class TrainingData:
    """The data folder a checkpoint was trained (and validated) on."""

    data_dir: Path
    synthetic: bool  # a generated set (the quick start's fallback or svhn.synthetic's)
    fallback: bool = False  # the quick start's fallback set in particular

    @property
    def label(self) -> str:
        """Short: ``synthetic`` or the folder's name."""
        return "synthetic" if self.synthetic else self.data_dir.name

    def describe(self) -> str:
        """``SYNTHETIC house numbers (the quick start's fallback set, PATH)`` or ``PATH``."""
        if not self.synthetic:
            return str(self.data_dir)
        what = "the quick start's fallback set, " if self.fallback else ""
        return f"SYNTHETIC house numbers ({what}{self.data_dir})"


def training_data_from_record(record: Any) -> TrainingData | None:
    """The ``data`` record of run_summary.json or a checkpoint (``SVHNDataModule.training_data``)
    as a TrainingData; None when it names no folder."""
    if not isinstance(record, dict) or not record.get("data_dir"):
        return None
    return TrainingData(Path(str(record["data_dir"])), bool(record.get("synthetic")),
                        bool(record.get("fallback")))
