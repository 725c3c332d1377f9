"""Shared fixtures and the repository guard.

The session-scoped fixtures (a tiny synthetic dataset, an easy set, and short fits on them)
are built once per session and must stay small: the test machine has two CPU cores shared
with other work. Tests must treat them as read-only. The functions and constants the tests
share live in ``tests/helpers/``.

Tests write only under temporary folders: each runs in its own ``tmp_path`` (the session
itself in a temporary folder), and the suite fails if the repository changed under it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers.easy import make_easy_dataset
from helpers.repository import REPO, changes, repository_state
from helpers.runs import (
    PLAIN_MODEL,
    EasyRun,
    TrainedCheckpoint,
    best_logged,
    fit_easy,
)

from svhn.console import HARMLESS_WARNINGS
from svhn.data.synthetic import generate_dataset

SYNTHETIC_COUNTS = {"n_train": 160, "n_val": 48, "n_test": 40}


def pytest_configure(config: pytest.Config) -> None:
    """The commands' one filter of libraries' harmless warnings (svhn.console) for the tests."""
    for message in HARMLESS_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")
    # The tests' sets are a few batches by design, fewer than a step-logging interval: the
    # warning a user with so little data should see says nothing about a test.
    config.addinivalue_line("filterwarnings",
                            "ignore:The number of training batches .* is smaller than the "
                            "logging interval")


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


# ------------------------------------------------------- the tiny synthetic set and its fit


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
    """A few epochs of the plain model on the synthetic set through the real fit CLI.

    Three un-augmented epochs without a schedule usually reach a non-zero val/seq_acc, so
    score comparisons test more than zeros; nothing may rely on how high it is.
    """
    from svhn.train.cli import build_cli

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
    # A cross-check of the callback: the best score the CSVLogger wrote.
    assert math.isclose(best_score, best_logged(log_dir / "metrics.csv"), abs_tol=1e-9)
    return TrainedCheckpoint(
        best=Path(callback.best_model_path),
        last=log_dir / "checkpoints" / "last.ckpt",
        val_seq_acc=best_score,
        log_dir=log_dir,
        data_dir=synthetic_data_dir,
        cache_dir=image_cache_dir,
    )


# ------------------------------------------------------------------ the easy set and its fits


@pytest.fixture(scope="session")
def easy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helpers.easy's set: 300 train, 81 val and 20 test-A images of one or two digits."""
    return make_easy_dataset(tmp_path_factory.mktemp("easy") / "mchar")


@pytest.fixture(scope="session")
def easy_fit():
    """``fit_easy``, for tests that train their own short runs on the easy set."""
    return fit_easy


@pytest.fixture(scope="session")
def easy_run(easy_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EasyRun:
    """simple_cnn read at 32x64, 8 epochs: has learned something, far from everything."""
    root = tmp_path_factory.mktemp("easy_run")
    run = fit_easy(easy_data_dir, root / "cache", root / "runs", "--model.lr", "0.01",
                   "--data.image_size", "[32, 64]", "--data.augment", "none",
                   "--trainer.max_epochs", "8")
    assert 0 < run.best_score < 1, f"the easy run should learn something: {run.best_score}"
    return run


@pytest.fixture(scope="session")
def easy_zoom_run(easy_run: EasyRun, tmp_path_factory: pytest.TempPathFactory) -> EasyRun:
    """A zoom reader (box head, crops from 2x sharper evaluation images) fine-tuned from
    ``easy_run``'s weights for 2 epochs."""
    root = tmp_path_factory.mktemp("easy_zoom_run")
    return fit_easy(easy_run.data_dir, root / "cache", root / "runs", "--model.lr", "0.003",
                    "--data.image_size", "[32, 64]", "--data.augment", "zoom",
                    "--data.cache_scale", "2", "--data.eval_scale", "2",
                    "--model.box_head", "true", "--model.zoom_steps", "1",
                    "--model.init_from", str(easy_run.last), "--trainer.max_epochs", "2")


# --------------------------------------------------------- the tiny run of the analysis


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic data (120 train / 40 val / 8 test-A), its image cache and the best
    checkpoint of 2 epochs of the quick-start recipe (``svhn.analysis.report.
    train_tiny_checkpoint``): keys data, cache, runs, ckpt. For test_report.py and
    test_notebooks.py."""
    from svhn.analysis import report

    root = tmp_path_factory.mktemp("tiny_run")
    paths = {"data": root / "data", "cache": root / "cache", "runs": root / "runs"}
    generate_dataset(paths["data"], n_train=120, n_val=40, n_test=8, seed=5)
    paths["ckpt"] = report.train_tiny_checkpoint(paths["data"], paths["runs"], paths["cache"])
    return paths
