"""Callbacks that ``svhn.fit`` adds to every fit."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from svhn.data.folds import FOLD_SPLITS
from svhn.precision import machine
from svhn.train.run_summary import (
    final_checkpoint,
    read_run_summary,
    val_is_held_out,
    write_run_summary,
)

__all__ = ["RunSummaryWriter"]


class RunSummaryWriter(Callback):
    """Writes ``run_summary.json`` into the run folder at the start and end of each fit."""

    def __init__(self, configs: list[str] | None = None) -> None:
        self.configs = [str(c) for c in configs or []]
        self.run_folder: Path | None = None
        self.summary: dict[str, Any] = {}
        self._start = 0.0

    @staticmethod
    def run_dir(trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath and Path(callback.dirpath).name == \
                "checkpoints":
            return Path(callback.dirpath).parent
        return Path(trainer.log_dir) if trainer.log_dir else None

    def on_fit_start(self, trainer, pl_module) -> None:
        run_dir = self.run_dir(trainer)
        if trainer.fast_dev_run or not trainer.is_global_zero or run_dir is None:
            return
        self.run_folder = run_dir
        try:
            self.summary = read_run_summary(run_dir) or {}
        except ValueError:
            self.summary = {}  # rewritten below rather than stopping a fit
        datamodule = trainer.datamodule
        hparams = getattr(datamodule, "hparams", {}) or {}
        train_on, val_on = hparams.get("train_on", ("train",)), hparams.get("val_on", "val")
        fold = hparams.get("fold") if hparams.get("folds") is not None else None
        if fold is not None:  # the other folds of train and val are trained on
            train_on = FOLD_SPLITS
            self.summary.update(folds=hparams["folds"], fold=fold)
        self.summary.setdefault("configs", self.configs)
        self.summary.update(train_on=list(train_on), val_on=val_on,
                            val_held_out=val_is_held_out(train_on, val_on, fold))
        if hasattr(datamodule, "training_data"):
            self.summary["data"] = datamodule.training_data()
        self.summary["machine"] = machine(trainer.strategy.root_device.type)
        counts = getattr(trainer.datamodule, "training_images", None)
        if counts is not None:
            self.summary["train_images"] = counts
        self.summary.setdefault("sessions", []).append({
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "started_unix": time.time(), "seconds": None, "status": "started, not finished",
            "configs": self.configs,
        })
        self._start = time.monotonic()
        self._write()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.run_folder is None:
            return
        held_out = bool(self.summary.get("val_held_out", True))
        checkpoint, why = final_checkpoint(trainer, held_out)
        self.summary.update(checkpoint=checkpoint, checkpoint_choice=why,
                            val_seq_acc=_result_score(trainer, held_out, checkpoint))
        self._end_session("finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.run_folder is None:
            return
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else \
            f"crashed ({type(exception).__name__})"
        self._end_session(status)

    def _end_session(self, status: str) -> None:
        session = self.summary["sessions"][-1]
        if session["seconds"] is None:
            session.update(seconds=round(time.monotonic() - self._start, 2), status=status)
            self._write()

    def _write(self) -> None:
        assert self.run_folder is not None
        write_run_summary(self.run_folder, self.summary)


def _result_score(trainer, held_out: bool, checkpoint: str) -> float | None:
    """val/seq_acc of the run's result: the best checkpoint's score when val was held out
    (a fold's held-out score), else the last epoch's."""
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_score", None)
    if held_out and best is not None and checkpoint == getattr(callback, "best_model_path", ""):
        return float(best)
    last = trainer.callback_metrics.get("val/seq_acc")
    return None if last is None else float(last)
