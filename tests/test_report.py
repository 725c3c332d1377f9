"""Tests for svhn.analysis, svhn.analysis.plots and the ``python -m svhn.report`` CLI.

Everything runs on a tiny synthetic set (120 train / 40 val) and a 2-epoch checkpoint of the
quick-start recipe: conftest's session fixture ``tiny_run`` (test_notebooks.py uses it too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.layout import write_split
from PIL import Image

from svhn.analysis import plots, report, tables
from svhn.checkpoint_format import read_checkpoint
from svhn.data.labels import BLANK, NUM_CLASSES
from svhn.inference.predictions import Predictions

MAX_LEN = 5


@pytest.fixture(scope="module")
def pred(tiny_run: dict[str, Path]) -> Predictions:
    return tables.predict_labelled(tiny_run["ckpt"], tiny_run["data"], "val",
                                   cache_dir=tiny_run["cache"])


def assert_png_drawn(path: Path, min_kb: float = 10) -> None:
    """A real picture: not tiny on disk and not a blank canvas."""
    assert path.is_file(), f"{path} missing"
    assert path.stat().st_size > min_kb * 1024, f"{path.name}: only {path.stat().st_size} B"
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert (grey < 200).mean() > 0.01, f"{path.name} is (nearly) blank"


# --------------------------------------------------------------------------- the CLI


def test_report_writes_every_error_figure_and_links_it(tiny_run, tmp_path):
    out = tmp_path / "report"
    code = report.main(["--ckpt_path", str(tiny_run["ckpt"]),
                        "--data_dir", str(tiny_run["data"]),
                        "--cache_dir", str(tiny_run["cache"]), "--out", str(out),
                        "--n_mistakes", "8"])
    assert code == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(report.ERROR_FIGURES)
    text = (out / "report.md").read_text()
    for name in report.ERROR_FIGURES:
        assert_png_drawn(out / f"{name}.png")
        assert f"]({name}.png)" in text
    assert str(tiny_run["ckpt"]) in text
    assert "Images: 40" in text and "**Score**" in text
    assert "Position accuracy (`position_acc`" in text


def test_data_figures_are_drawn_and_linked(tiny_run, pred, tmp_path):
    """What ``--data_figures`` adds to the report."""
    figures = report.write_data_figures(tiny_run["data"], tiny_run["cache"], tmp_path)
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


def test_scores_match_what_training_logged(tiny_run, pred):
    """The analysis counts like SequenceMetrics: the checkpoint's epoch row agrees."""
    metrics = tables.read_metrics(tables.run_dir_of(tiny_run["ckpt"]))
    epoch = read_checkpoint(tiny_run["ckpt"]).epoch
    logged = metrics[(metrics["epoch"] == epoch) & metrics["val/position_acc"].notna()].iloc[-1]
    numbers = tables.summary(pred)
    assert numbers["images"] == 40
    assert numbers["position_acc"] == pytest.approx(logged["val/position_acc"], abs=1e-4)
    assert numbers["score"] == pytest.approx(logged["val/seq_acc"], abs=1e-4)


def test_confusion_counts_every_position_once(pred):
    matrix = tables.confusion_matrix(pred.probs, pred.targets)
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES)
    assert matrix.sum() == len(pred) * MAX_LEN
    true_counts = np.bincount(pred.targets.flatten().numpy(), minlength=NUM_CLASSES)
    assert (matrix.sum(axis=1) == true_counts).all()
    assert np.trace(matrix) / matrix.sum() == pytest.approx(
        tables.position_accuracy(pred.probs, pred.targets))
    assert list(tables.confusion_frame(matrix).columns)[-1] == "blank"


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
    write_split(tmp_path, "val", names, size=(30, 15), image=(200, 50, 50))  # no labels
    return Predictions(names, one_hot(READ, [0.9, 0.8, 0.7, 0.95]), targets=TARGETS,
                       checkpoints=[Path("x.ckpt")], data_dir=tmp_path, split="val")


def test_accuracy_tables_on_hand_made_predictions(tmp_path):
    pred = hand_made_predictions(tmp_path)
    assert tables.sequence_accuracy(pred.probs, pred.targets) == pytest.approx(0.5)
    assert tables.position_accuracy(pred.probs, pred.targets) == pytest.approx(16 / 20)
    assert tables.digit_accuracy(pred.probs, pred.targets) == pytest.approx(4 / 7)

    table = tables.prediction_table(pred)
    assert table["prediction"].tolist() == ["12", "3", "458", "9"]
    assert table["truth"].tolist() == ["12", "3", "456", "7"]
    assert table["correct"].tolist() == [True, True, False, False]

    by_length = tables.accuracy_by_length(table)
    assert by_length.to_dict("list") == {"length": [1, 2, 3], "images": [2, 1, 1],
                                         "accuracy": [0.5, 1.0, 0.0]}
    by_position = tables.accuracy_by_position(pred.probs, pred.targets)
    assert by_position["digit_slots"].tolist() == [4, 2, 1, 0, 0]
    assert by_position["accuracy"].tolist() == pytest.approx([0.5, 0.75, 0.75, 1, 1])
    assert by_position["digit_accuracy"].tolist()[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert by_position["digit_accuracy"].isna().tolist() == [False, False, False, True, True]


def test_confident_mistakes_come_most_confident_first(tmp_path):
    pred = hand_made_predictions(tmp_path)
    mistakes = tables.confident_mistakes(pred, n=5)
    assert [m.truth for m in mistakes] == ["7", "456"]  # 0.95 before 0.7
    assert mistakes[0].prediction == "9" and mistakes[0].image.shape == (15, 30, 3)
    assert mistakes[0].confidence == pytest.approx(0.95 ** 5)
    figure = plots.confident_mistakes(mistakes)
    assert_png_drawn(plots.save(figure, tmp_path / "mistakes.png"), min_kb=5)


# --------------------------------------------------------------------------- data tables


def test_data_tables_describe_the_split(tiny_run):
    table = tables.sample_table(tiny_run["data"])
    assert (table["split"].value_counts().to_dict()) == {"train": 120, "val": 40}
    for column in ("box_w", "box_h", "box_cx", "box_cy"):
        assert table[column].between(0, 1).all(), column
    assert (table["width"] > 0).all() and (table["height"] > 0).all()
    assert tables.length_counts(table).to_numpy().sum() == 160
    assert tables.digit_counts(table)["train"].sum() == table.query("split == 'train'")[
        "length"].sum()
    assert tables.digit_position_counts(table).to_numpy().sum() == table["length"].sum()
    counts = tables.split_counts(tiny_run["data"])
    assert counts.set_index("split")["images"].to_dict() == {"train": 120, "val": 40,
                                                             "test_a": 8}


def test_augmentation_draws_keep_the_box_in_the_picture(tiny_run):
    examples = tables.augmentation_draws(tiny_run["data"], tiny_run["cache"], n_images=2,
                                         n_draws=3)
    assert len(examples) == 2
    for example in examples:
        assert set(example.draws) == set(tables.AUGMENT_PRESETS)
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
    assert tables.metric_curve(metrics, "val/loss").to_dict("list") == {
        "step": [3, 7], "val/loss": [1.8, 1.6]}
    assert tables.metric_curve(metrics, "val/seq_acc").empty
    assert tables.epoch_end_step(metrics, 1) == 7
    assert_png_drawn(plots.save(plots.training_curves(metrics, 1), tmp_path / "c.png"), 5)


def test_training_curves_say_when_there_is_no_metrics_file(tmp_path):
    assert tables.read_metrics(tmp_path) is None
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
    data_dir = tmp_path / "competition" / "mchar"
    cache = report.cache_dir_for(data_dir)
    assert cache.parent == tmp_path / "c"
    assert not cache.is_relative_to(data_dir)
