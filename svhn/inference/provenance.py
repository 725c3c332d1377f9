"""What data a checkpoint was trained on, and a notice when it reads other data.

A fit records what it trained on (``SVHNDataModule.training_data``: the resolved data folder
and whether it is a synthetic set) in every checkpoint and in its run's
``run_summary.json``. Older checkpoints are read from the run's summary, else from their
data settings where those say it (a named ``data_dir``; ``data/mchar`` without the synthetic
fallback); the quick start's ``data_dir: null`` with the fallback on says nothing certain,
and then nothing is claimed.
"""

from __future__ import annotations

from pathlib import Path

from svhn.checkpoint_format import CheckpointContents
from svhn.data.layout import is_generated_set
from svhn.paths import DATA_DIR
from svhn.run_dir import RunDir
from svhn.train.run_summary import TrainingData, read_run_summary, training_data_from_record

__all__ = ["data_kind", "data_notice", "fold_notice", "training_data"]


def training_data(contents: CheckpointContents) -> TrainingData | None:
    """What ``contents`` was trained on, from the checkpoint, its run's summary or its data
    settings; None when none of them says."""
    found = training_data_from_record(contents.trained_on)
    if found is not None:
        return found
    run = RunDir.of_checkpoint(contents.path)
    if run is not None:
        try:
            found = training_data_from_record((read_run_summary(run.path) or {}).get("data"))
        except ValueError:
            found = None
        if found is not None:
            return found
    data = contents.data
    if data.get("data_dir"):
        folder = Path(str(data["data_dir"])).resolve()
        return TrainingData(folder, is_generated_set(folder))
    if "synthetic_fallback" in data and not data["synthetic_fallback"]:
        return TrainingData(DATA_DIR.resolve(), is_generated_set(DATA_DIR))
    return None


def data_kind(data_dir: str | Path) -> str:
    """``synthetic`` for a generated set, else ``competition``."""
    return "synthetic" if is_generated_set(data_dir) else "competition"


def data_notice(contents: CheckpointContents, data_dir: str | Path) -> str | None:
    """One line when the checkpoint reads other data than it was trained on, else None."""
    trained = training_data(contents)
    reading = Path(data_dir).resolve()
    if trained is None or trained.data_dir.resolve() == reading:
        return None
    now = f"the synthetic set {reading}" if is_generated_set(reading) else str(reading)
    return (f"Note: {contents.path.name} was trained on {trained.describe()}, not on {now} "
            "that it reads now.")


def fold_notice(contents: CheckpointContents, split: str) -> str | None:
    """One line when a cross-validation checkpoint (``--data.folds``) reads train or val:
    it trained on the folds of both but its own, so a score there is not held out."""
    folds, fold = contents.data.get("folds"), contents.data.get("fold")
    if folds is None or fold is None or split not in ("train", "val"):
        return None
    return (f"Note: {contents.path.name} is fold {fold}/{folds} of train + val: it trained on "
            f"the other folds, so most of split {split} was trained on and a score on it is "
            "not held out (its held-out score: best_val in python -m svhn.runs).")
