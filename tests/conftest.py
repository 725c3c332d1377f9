"""Shared, session-scoped fixtures: a tiny synthetic dataset and a briefly trained checkpoint.

Both are built once per test session and must stay small: the test machine has two CPU
cores shared with other work. Tests must treat them as read-only.

Tests write only under temporary folders: each runs in its own ``tmp_path`` (the session
itself in a temporary folder), and the suite fails if the repository changed under it.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from svhn.synthetic import generate_dataset

SYNTHETIC_COUNTS = {"n_train": 160, "n_val": 48, "n_test": 40}
REPO = Path(__file__).resolve().parents[1]
# The tests' own small model: the tutorial's CNN in float32 without box head or zoom, fast on
# two cores whatever recipe configs/default.yaml (the quick start) holds. Flags after it win.
PLAIN_MODEL = ["--model.backbone", "simple_cnn", "--model.feature_grid", "null",
               "--model.box_head", "false", "--model.zoom", "false",
               "--model.channels_last", "false", "--model.optimizer", "adam",
               "--model.weight_decay", "0", "--trainer.precision", "32-true",
               "--data.augment", "baseline", "--data.cache_scale", "1",
               "--data.eval_scale", "1", "--data.image_size", "[64, 128]",
               "--data.batch_size", "64"]
NOT_WATCHED = {".git", ".venv", "venv", ".pytest_cache", ".ruff_cache", "__pycache__",
               ".ipynb_checkpoints"}


def repository_state(root: Path = REPO) -> dict[str, int]:
    """Every file and folder under the repository (tool caches aside) -> modification time."""
    state = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_WATCHED and not d.endswith(".egg-info")]
        here = Path(folder).relative_to(root)
        state.update({f"{here / d}/": 0 for d in dirs})
        state.update({str(here / f): Path(folder, f).stat().st_mtime_ns for f in files})
    return state


def changes(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted([f"+ {p}" for p in after.keys() - before.keys()]
                  + [f"- {p}" for p in before.keys() - after.keys()]
                  + [f"~ {p}" for p in before.keys() & after.keys() if before[p] != after[p]])


@pytest.fixture(scope="session", autouse=True)
def repository_stays_unchanged(tmp_path_factory: pytest.TempPathFactory):
    """The session runs in a temporary folder; afterwards the repository must be as before
    (a test that writes checkpoints/, runs/ or data/ into it fails the suite here)."""
    before = repository_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("session_cwd"))
        yield
    changed = changes(before, repository_state())
    assert not changed, f"the tests changed the repository {REPO}: {changed[:20]}"


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths a test writes (runs/, data/cache, checkpoints/) land in its tmp_path."""
    monkeypatch.chdir(tmp_path)


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
        *PLAIN_MODEL,
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
        last=Path(callback.last_model_path),
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
