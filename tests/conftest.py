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
import torch

from svhn.synthetic import generate_dataset

SYNTHETIC_COUNTS = {"n_train": 160, "n_val": 48, "n_test": 40}
REPO = Path(__file__).resolve().parents[1]
# The tests' own small model: the tutorial's CNN in float32 without box head or zoom, fast on
# two cores whatever recipe configs/default.yaml (the quick start) holds. Flags after it win.
PLAIN_MODEL = ["--model.backbone", "simple_cnn", "--model.feature_grid", "null",
               "--model.box_head", "false", "--model.zoom_steps", "0",
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


# ---------------------------------------------------------------------------------------
# An easy set a small model learns in seconds, so round trips compare real scores.
#
# Dark digits (1 or 2) centred with a few pixels of jitter on a light, mildly noisy
# background, in the competition layout with true per-digit boxes. simple_cnn reaches a
# val/seq_acc of about 0.2-0.3 in 8 epochs: above zero, below one, with many borderline
# images, so a change in what the model is fed moves the numbers.

EASY_IMAGE = (128, 64)  # (width, height) of every image on disk
EASY_COUNTS = {"mchar_train": 300, "mchar_val": 81, "mchar_test_a": 20}  # 81: odd, for DDP
EASY_FIT_ARGS = (
    *PLAIN_MODEL, "--data.num_workers", "0", "--data.batch_size", "32", "--data.max_len", "2",
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--model.scheduler", "none",
)


def draw_easy_number(digits: list[int], rng, digit_height: int = 26, jitter: int = 6):
    """An RGB image of ``digits`` and one (left, top, width, height) box per digit."""
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font_path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    font = ImageFont.truetype(str(font_path), int(digit_height * 1.35))
    width, height = EASY_IMAGE
    background = int(rng.integers(190, 240))
    ink = background - int(rng.integers(150, 190))
    image = Image.new("L", EASY_IMAGE, background)
    draw = ImageDraw.Draw(image)
    extents = [font.getbbox(str(d)) for d in digits]
    total = sum(e[2] - e[0] for e in extents) + 2 * (len(digits) - 1)
    x = (width - total) // 2 + int(rng.integers(-jitter, jitter + 1))
    zero = font.getbbox("0")
    y = (height - (zero[3] - zero[1])) // 2 + int(rng.integers(-jitter, jitter + 1)) - zero[1]
    boxes = []
    for digit, extent in zip(digits, extents):
        draw.text((x - extent[0], y), str(digit), fill=ink, font=font)
        boxes.append((x, y + extent[1], extent[2] - extent[0], extent[3] - extent[1]))
        x += extent[2] - extent[0] + 2
    pixels = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB"), boxes


def make_easy_dataset(root: Path, seed: int = 0) -> Path:
    """The competition layout (plus test-A labels and a sample submission) of easy images."""
    import json

    import numpy as np

    label_files = {"mchar_train": "mchar_train.json", "mchar_val": "mchar_val.json",
                   "mchar_test_a": "mchar_test_a_labels.json"}
    for split_index, (split, count) in enumerate(EASY_COUNTS.items()):
        (root / split).mkdir(parents=True)
        entries = {}
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            digits = [int(d) for d in rng.integers(0, 10, int(rng.integers(1, 3)))]
            image, boxes = draw_easy_number(digits, rng)
            name = f"{i:06d}.png"
            image.save(root / split / name)
            entries[name] = {"label": digits, "left": [b[0] for b in boxes],
                             "top": [b[1] for b in boxes], "width": [b[2] for b in boxes],
                             "height": [b[3] for b in boxes]}
        (root / label_files[split]).write_text(json.dumps(entries))
    names = sorted(p.name for p in (root / "mchar_test_a").iterdir())
    (root / "mchar_sample_submit_A.csv").write_text(
        "file_name,file_code\n" + "".join(f"{name},0\n" for name in names))
    return root


@dataclass(frozen=True)
class EasyRun:
    """A fit on ``easy_data_dir``: its best checkpoint, its last one and what it logged."""

    best: Path
    last: Path
    best_score: float  # the logged val/seq_acc of ``best``
    metrics: Path  # the run's metrics.csv
    data_dir: Path
    cache_dir: Path
    args: tuple[str, ...]  # the fit's arguments (model and data settings included)


@pytest.fixture(scope="session")
def easy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_easy_dataset(tmp_path_factory.mktemp("easy") / "mchar")


def fit_easy(data_dir: Path, cache_dir: Path, runs: Path, *extra: str) -> EasyRun:
    """``svhn.fit`` on the easy set in this process; ``extra`` adds or overrides flags."""
    from svhn.fit import build_cli

    args = ("--data.data_dir", str(data_dir), "--data.cache_dir", str(cache_dir),
            "--trainer.logger.init_args.save_dir", str(runs), *EASY_FIT_ARGS, *extra)
    cli = build_cli(list(args))
    callback = cli.trainer.checkpoint_callback
    return EasyRun(best=Path(callback.best_model_path),
                   last=Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt",
                   best_score=float(callback.best_model_score),
                   metrics=Path(cli.trainer.log_dir) / "metrics.csv", data_dir=data_dir,
                   cache_dir=cache_dir, args=args)


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


def reading_logits(readings: list[list[int]], confidence: float, max_len: int = 3
                   ) -> torch.Tensor:
    """(B, max_len, 11) logits reading each list of classes with top probability
    ``confidence`` at every position."""
    logits = torch.full((len(readings), max_len, 11), math.log((1 - confidence) / 10))
    for row, classes in enumerate(readings):
        for position, cls in enumerate(classes):
            logits[row, position, cls] = math.log(confidence)
    return logits
