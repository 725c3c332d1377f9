"""Tests for svhn.analysis, svhn.plots and the ``python -m svhn.report`` CLI.

Everything runs on a tiny synthetic set (120 train / 40 val) and a 2-epoch simple CNN, made
once per session by ``make_tiny_run`` (test_notebooks.py reuses it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from svhn import analysis, plots, report
from svhn.checkpoints import read_checkpoint
from svhn.inference import Predictions
from svhn.labels import BLANK, NUM_CLASSES
from svhn.synthetic import generate_dataset

MAX_LEN = 5


# --------------------------------------------------------------------------- shared tiny run


def make_tiny_run(base: Path) -> dict[str, Path]:
    """Synthetic data, an image cache and a tiny checkpoint under ``base`` (made once)."""
    root = base / "tiny_run"
    paths = {"data": root / "data", "cache": root / "cache", "runs": root / "runs"}
    done = root / "checkpoint.txt"
    if not done.is_file():
        generate_dataset(paths["data"], n_train=120, n_val=40, n_test=8, seed=5)
        ckpt = report.train_tiny_checkpoint(paths["data"], paths["runs"], paths["cache"])
        done.write_text(str(ckpt))
    paths["ckpt"] = Path(done.read_text())
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def pred(tiny: dict[str, Path]) -> Predictions:
    return analysis.predict_split(tiny["ckpt"], tiny["data"], "val", tiny["cache"])


def assert_png_drawn(path: Path, min_kb: float = 10) -> None:
    """A real picture: not tiny on disk and not a blank canvas."""
    assert path.is_file(), f"{path} missing"
    assert path.stat().st_size > min_kb * 1024, f"{path.name}: only {path.stat().st_size} B"
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert (grey < 200).mean() > 0.01, f"{path.name} is (nearly) blank"


# --------------------------------------------------------------------------- the CLI


def test_report_writes_every_error_figure_and_links_it(tiny, tmp_path):
    out = tmp_path / "report"
    code = report.main(["--ckpt_path", str(tiny["ckpt"]), "--data_dir", str(tiny["data"]),
                        "--cache_dir", str(tiny["cache"]), "--out", str(out),
                        "--n_mistakes", "8"])
    assert code == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(report.ERROR_FIGURES)
    text = (out / "report.md").read_text()
    for name in report.ERROR_FIGURES:
        assert_png_drawn(out / f"{name}.png")
        assert f"]({name}.png)" in text
    assert str(tiny["ckpt"]) in text
    assert "Images: 40" in text and "**Score**" in text and "Character accuracy" in text


def test_data_figures_are_drawn_and_linked(tiny, pred, tmp_path):
    """What ``--data_figures`` adds to the report."""
    figures = report.write_data_figures(tiny["data"], tiny["cache"], tmp_path)
    assert list(figures) == list(report.DATA_FIGURES)
    for path in figures.values():
        assert_png_drawn(path)
    text = report.report_markdown(pred, figures)
    assert all(f"]({name}.png)" in text for name in report.DATA_FIGURES)


def test_report_cli_explains_a_missing_checkpoint(tmp_path, capsys):
    code = report.main(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)])
    assert code == 2
    assert "nope.ckpt" in capsys.readouterr().err


# --------------------------------------------------------------------------- predictions


def test_scores_match_what_training_logged(tiny, pred):
    """The analysis counts like SequenceMetrics: the checkpoint's epoch row agrees."""
    metrics = analysis.read_metrics(analysis.run_dir_of(tiny["ckpt"]))
    epoch = read_checkpoint(tiny["ckpt"]).epoch
    logged = metrics[(metrics["epoch"] == epoch) & metrics["val/char_acc"].notna()].iloc[-1]
    numbers = analysis.summary(pred)
    assert numbers["images"] == 40
    assert numbers["char_acc"] == pytest.approx(logged["val/char_acc"], abs=1e-4)
    assert numbers["score"] == pytest.approx(logged["val/seq_acc"], abs=1e-4)


def test_confusion_counts_every_position_once(pred):
    matrix = analysis.confusion_matrix(pred.probs, pred.targets)
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES)
    assert matrix.sum() == len(pred) * MAX_LEN
    true_counts = np.bincount(pred.targets.flatten().numpy(), minlength=NUM_CLASSES)
    assert (matrix.sum(axis=1) == true_counts).all()
    assert np.trace(matrix) / matrix.sum() == pytest.approx(
        analysis.char_accuracy(pred.probs, pred.targets))
    assert list(analysis.confusion_frame(matrix).columns)[-1] == "blank"


def one_hot(rows: list[list[int]], sure: list[float]) -> torch.Tensor:
    """Probabilities putting ``sure`` on each row's classes, the rest spread evenly."""
    probs = torch.zeros(len(rows), MAX_LEN, NUM_CLASSES)
    for i, (classes, p) in enumerate(zip(rows, sure)):
        probs[i] = (1 - p) / (NUM_CLASSES - 1)
        probs[i, torch.arange(MAX_LEN), torch.tensor(classes)] = p
    return probs


B = BLANK
TARGETS = torch.tensor([[1, 2, B, B, B], [3, B, B, B, B], [4, 5, 6, B, B], [7, B, B, B, B]])
# Image 1 reads "3" with the digit in the second slot: right as a string, wrong per slot.
READ = [[1, 2, B, B, B], [B, 3, B, B, B], [4, 5, 8, B, B], [9, B, B, B, B]]


def hand_made_predictions(tmp_path: Path) -> Predictions:
    names = [f"{i:06d}.png" for i in range(4)]
    (tmp_path / "mchar_val").mkdir()
    for name in names:
        Image.new("RGB", (30, 15), (200, 50, 50)).save(tmp_path / "mchar_val" / name)
    return Predictions(names, one_hot(READ, [0.9, 0.8, 0.7, 0.95]), targets=TARGETS,
                       checkpoints=[Path("x.ckpt")], data_dir=tmp_path, split="val")


def test_accuracy_tables_on_hand_made_predictions(tmp_path):
    pred = hand_made_predictions(tmp_path)
    assert analysis.sequence_accuracy(pred.probs, pred.targets) == pytest.approx(0.5)
    assert analysis.char_accuracy(pred.probs, pred.targets) == pytest.approx(16 / 20)
    assert analysis.digit_accuracy(pred.probs, pred.targets) == pytest.approx(4 / 7)

    table = analysis.prediction_table(pred)
    assert table["prediction"].tolist() == ["12", "3", "458", "9"]
    assert table["truth"].tolist() == ["12", "3", "456", "7"]
    assert table["correct"].tolist() == [True, True, False, False]

    by_length = analysis.accuracy_by_length(table)
    assert by_length.to_dict("list") == {"length": [1, 2, 3], "images": [2, 1, 1],
                                         "accuracy": [0.5, 1.0, 0.0]}
    by_position = analysis.accuracy_by_position(pred.probs, pred.targets)
    assert by_position["digit_slots"].tolist() == [4, 2, 1, 0, 0]
    assert by_position["accuracy"].tolist() == pytest.approx([0.5, 0.75, 0.75, 1, 1])
    assert by_position["digit_accuracy"].tolist()[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert by_position["digit_accuracy"].isna().tolist() == [False, False, False, True, True]


def test_confident_mistakes_come_most_confident_first(tmp_path):
    pred = hand_made_predictions(tmp_path)
    mistakes = analysis.confident_mistakes(pred, n=5)
    assert [m.truth for m in mistakes] == ["7", "456"]  # 0.95 before 0.7
    assert mistakes[0].prediction == "9" and mistakes[0].image.shape == (15, 30, 3)
    assert mistakes[0].confidence == pytest.approx(0.95 ** 5)
    figure = plots.confident_mistakes(mistakes)
    assert_png_drawn(plots.save(figure, tmp_path / "mistakes.png"), min_kb=5)


# --------------------------------------------------------------------------- data tables


def test_data_tables_describe_the_split(tiny):
    table = analysis.sample_table(tiny["data"])
    assert (table["split"].value_counts().to_dict()) == {"train": 120, "val": 40}
    for column in ("box_w", "box_h", "box_cx", "box_cy"):
        assert table[column].between(0, 1).all(), column
    assert (table["width"] > 0).all() and (table["height"] > 0).all()
    assert analysis.length_counts(table).to_numpy().sum() == 160
    assert analysis.digit_counts(table)["train"].sum() == table.query("split == 'train'")[
        "length"].sum()
    assert analysis.digit_position_counts(table).to_numpy().sum() == table["length"].sum()
    counts = analysis.split_counts(tiny["data"])
    assert counts.set_index("split")["images"].to_dict() == {"train": 120, "val": 40,
                                                             "test_a": 8}


def test_augmentation_draws_keep_the_box_in_the_picture(tiny):
    examples = analysis.augmentation_draws(tiny["data"], tiny["cache"], n_images=2, n_draws=3)
    assert len(examples) == 2
    for example in examples:
        assert set(example.draws) == set(analysis.AUGMENT_PRESETS)
        image, box = example.original
        assert image.shape == (64, 128, 3) and image.dtype == np.uint8
        for draws in example.draws.values():
            assert len(draws) == 3
            for image, (x0, y0, x1, y1) in draws:
                assert image.shape == (64, 128, 3)
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        zoomed = [image for image, _ in example.draws["zoom"]]
        assert any(not np.array_equal(zoomed[0], z) for z in zoomed[1:]), "draws all equal"


# --------------------------------------------------------------------------- curves, inputs


def test_metric_curve_drops_rows_without_the_metric(tmp_path):
    metrics = pd.DataFrame({"epoch": [0, 0, 0, 1, 1], "step": [1, 3, 3, 5, 7],
                            "train/loss": [2.0, 1.5, np.nan, 1.2, np.nan],
                            "val/loss": [np.nan, np.nan, 1.8, np.nan, 1.6]})
    assert analysis.metric_curve(metrics, "val/loss").to_dict("list") == {
        "step": [3, 7], "val/loss": [1.8, 1.6]}
    assert analysis.metric_curve(metrics, "val/seq_acc").empty
    assert analysis.epoch_end_step(metrics, 1) == 7
    assert_png_drawn(plots.save(plots.training_curves(metrics, 1), tmp_path / "c.png"), 5)


def test_training_curves_say_when_there_is_no_metrics_file(tmp_path):
    assert analysis.read_metrics(tmp_path) is None
    figure = plots.training_curves(None)
    assert "No metrics.csv" in figure.axes[0].texts[0].get_text()


def test_find_checkpoint_takes_the_newest_that_is_not_last(tmp_path):
    assert report.find_checkpoint(tmp_path) is None
    older = tmp_path / "a" / "version_0" / "checkpoints" / "epoch001.ckpt"
    newer = tmp_path / "b" / "version_3" / "checkpoints" / "epoch007.ckpt"
    last = tmp_path / "b" / "version_3" / "checkpoints" / "last.ckpt"
    for age, path in enumerate((last, newer, older)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
    assert report.find_checkpoint(tmp_path) == newer


def test_data_dir_from_env_must_hold_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SVHN_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SVHN_DATA_DIR"):
        report.find_data_dir()


def test_cache_dir_follows_env_and_never_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SVHN_CACHE_DIR", str(tmp_path / "c"))
    cache = report.cache_dir_for("/work/shared/data/mchar")
    assert cache.parent == tmp_path / "c"
    assert not str(cache).startswith("/work/shared")
