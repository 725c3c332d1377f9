"""Shared, session-scoped fixtures: a tiny synthetic dataset and a briefly trained checkpoint.

Both are built once per test session and must stay small: the test machine has two CPU
cores shared with other work. Tests must treat them as read-only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from svhn.synthetic import generate_dataset

SYNTHETIC_COUNTS = {"n_train": 160, "n_val": 48, "n_test": 40}


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A short fit on ``synthetic_data_dir``: its checkpoints and the logged best score."""

    best: Path  # the checkpoint callback's best model (by val/seq_acc)
    last: Path  # last.ckpt of the same run
    val_seq_acc: float  # best_model_score: the val/seq_acc logged for ``best``
    log_dir: Path  # the run's folder (metrics.csv, config.yaml, checkpoints/)
    data_dir: Path
    cache_dir: Path


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The competition layout (plus test-A labels and a sample submission), 248 images."""
    out = tmp_path_factory.mktemp("synthetic") / "mchar"
    return generate_dataset(out, seed=0, **SYNTHETIC_COUNTS)


@pytest.fixture(scope="session")
def image_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache for the session (caches are keyed by split and size)."""
    return tmp_path_factory.mktemp("image_cache")


@pytest.fixture(scope="session")
def trained_checkpoint(
    synthetic_data_dir: Path, image_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedCheckpoint:
    """A few epochs of the default model on the synthetic set through the real fit CLI.

    Three un-augmented epochs without a schedule usually reach a non-zero val/seq_acc, so
    score comparisons test more than zeros; nothing may rely on how high it is.
    """
    from svhn.fit import build_cli

    runs = tmp_path_factory.mktemp("runs")
    cli = build_cli([
        "--trainer.max_epochs", "3",
        "--model.scheduler", "none",
        "--data.augment", "none",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.data_dir", str(synthetic_data_dir),
        "--data.num_workers", "0",
        "--data.batch_size", "32",
        "--data.cache_dir", str(image_cache_dir),
        "--trainer.logger.init_args.save_dir", str(runs),
    ])
    callback = cli.trainer.checkpoint_callback
    log_dir = Path(cli.trainer.log_dir)
    best_score = float(callback.best_model_score)
    assert math.isclose(best_score, _best_logged(log_dir / "metrics.csv"), abs_tol=1e-9)
    return TrainedCheckpoint(
        best=Path(callback.best_model_path),
        last=log_dir / "checkpoints" / "last.ckpt",
        val_seq_acc=best_score,
        log_dir=log_dir,
        data_dir=synthetic_data_dir,
        cache_dir=image_cache_dir,
    )


def _best_logged(metrics_csv: Path, key: str = "val/seq_acc") -> float:
    """The best value of ``key`` that the CSVLogger wrote (a cross-check of the callback)."""
    with metrics_csv.open(newline="") as handle:
        values = [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]
    return max(values)
