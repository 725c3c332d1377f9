"""Learning from images without labels (``--data.unlabelled``, ``--pseudo_labels.*``):
no leak of the images a run scores, only confident readings as targets, digit boxes in the
image's coordinates, the round inside a fit, and that it learns from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.easy import make_easy_dataset
from helpers.runs import PLAIN_MODEL, learning_rates

from svhn.data.datamodule import SVHNDataModule
from svhn.data.labels import BLANK, Sample, encode_label
from svhn.data.unlabelled import check_unlabelled_source, pseudo_samples
from svhn.errors import SettingError
from svhn.model.reader import DigitReader
from svhn.model.vote import answer_confidence
from svhn.train.cli import main as fit_main
from svhn.train.pseudo_labels import PseudoLabels, read_unlabelled


def _probs(*readings: list[int], sure: float = 0.98) -> torch.Tensor:
    """(N, 5, 11) probabilities that read each list of classes (10: blank)."""
    out = torch.full((len(readings), 5, 11), (1 - sure) / 10)
    for row, classes in enumerate(readings):
        for position, cls in enumerate(classes):
            out[row, position, cls] = sure
    return out


# -------------------------------------------------------------------- no leak of scored images


@pytest.mark.parametrize("source, settings, says", [
    ("val", {}, "validates on"),
    ("train", {}, "already trains on"),
    ("val", {"train_on": ("train", "val"), "val_on": "test_a"}, "already trains on"),
    ("train", {"folds": 5}, "validates on"),
])
def test_images_the_run_scores_or_trains_on_are_refused_as_unlabelled(synthetic_data_dir,
                                                                      source, settings, says):
    arguments = {"train_on": ("train",), "val_on": "val", "folds": None, **settings}
    with pytest.raises(SettingError, match=says):
        check_unlabelled_source(source, synthetic_data_dir, **arguments)
    if arguments["val_on"] != "test_a":
        check_unlabelled_source("test_a", synthetic_data_dir, **arguments)  # never scored


def test_a_folder_that_is_the_validation_folder_is_refused(synthetic_data_dir, tmp_path):
    link = tmp_path / "just_photos"
    link.symlink_to(synthetic_data_dir / "mchar_val")
    with pytest.raises(SettingError, match="validates on"):
        SVHNDataModule(str(synthetic_data_dir), unlabelled=str(link), num_workers=0)


def test_svhn_fit_refuses_the_validation_split_in_one_line_and_writes_nothing(
        synthetic_data_dir, tmp_path, capsys):
    code = fit_main([*PLAIN_MODEL, "--data.data_dir", str(synthetic_data_dir),
                     "--data.unlabelled", "val", "--trainer.max_epochs", "1",
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("error: data.unlabelled val")
    assert not (tmp_path / "runs").exists()


def test_a_reader_without_digit_boxes_is_refused_before_training(easy_data_dir, tmp_path,
                                                                 capsys):
    args = _fit_args(easy_data_dir, tmp_path, "--model.char_boxes", "false",
                     "--trainer.max_epochs", "1", "--data.unlabelled", "test_a")
    assert fit_main(args) == 2
    assert "needs each digit's box" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("*/version_*"))


def test_a_folder_of_photos_is_read_as_unlabelled_images(easy_data_dir, tmp_path):
    import shutil

    from svhn.data.layout import DataError

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.PNG"):
        shutil.copy(easy_data_dir / "mchar_test_a" / "000001.png", photos / name)
    (photos / "notes.txt").write_text("not an image")
    dm = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0,
                        cache_dir=str(tmp_path / "cache"), unlabelled=str(photos))
    assert dm.unlabelled_set().names == ["a.png", "b.PNG"]
    assert dm.training_data()["unlabelled"]["images"] == 2
    for image in ("a.png", "b.PNG"):
        (photos / image).unlink()
    empty = SVHNDataModule(str(easy_data_dir), num_workers=0, unlabelled=str(photos))
    with pytest.raises(DataError, match="no image in it"):
        empty.unlabelled_set()


# -------------------------------------------------------------- confident readings, in pixels


def test_only_confident_readings_become_targets():
    probs = _probs([3, 7, 10, 10, 10], [1, 10, 10, 10, 10], [10, 10, 10, 10, 10])
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.8]] * 5).repeat(3, 1, 1)
    confidence = torch.tensor([0.95, 0.89, 0.99])
    sizes = np.array([[200, 100]] * 3)
    kept = pseudo_samples(["a.png", "b.png", "c.png"], probs, boxes, confidence, sizes, 0.9)
    # b is unsure (0.89 < 0.9); c reads no digit at all, however sure: nothing to learn.
    assert [s.file_name for s in kept] == ["a.png"]
    assert kept[0].digits == (3, 7)
    assert [s.file_name for s in pseudo_samples(["a.png", "b.png", "c.png"], probs, boxes,
                                                confidence, sizes, 0.89)] == ["a.png", "b.png"]


def test_pseudo_label_boxes_are_the_digits_boxes_in_the_image_s_pixels():
    # A blank between two digits is dropped with its box, as the submission decodes.
    probs = _probs([4, 10, 2, 10, 10])
    boxes = torch.zeros(1, 5, 4)
    boxes[0, 0] = torch.tensor([0.10, 0.20, 0.30, 0.80])
    boxes[0, 2] = torch.tensor([0.35, 0.25, 0.50, 0.75])
    (sample,) = pseudo_samples(["x.png"], probs, boxes, torch.ones(1), np.array([[200, 100]]),
                               0.5)
    assert sample.digits == (4, 2)
    np.testing.assert_allclose(sample.boxes, [(20, 20, 40, 60), (70, 25, 30, 50)], atol=1e-4)
    # A digit without a box (the detector could not learn it) keeps the image out.
    boxes[0, 2] = 0
    assert pseudo_samples(["x.png"], probs, boxes, torch.ones(1), np.array([[200, 100]]),
                          0.5) == []


class _FixedReads(DigitReader):
    """A zooming reader whose every read says: digit 3 at the middle fifth of what it saw."""

    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(images)
        logits = torch.full((n, self.max_len, 11), -5.0)
        logits[:, 0, 3] = 5.0
        logits[:, 1:, BLANK] = 5.0
        chars = torch.zeros(n, self.max_len, 4)
        chars[:, 0] = torch.tensor([0.4, 0.4, 0.6, 0.6])
        return {"logits": logits, "box": torch.tensor([[0.5, 0.0, 1.0, 0.5]]).expand(n, 4),
                "char_boxes": chars}


def test_a_zooming_teacher_gives_digit_boxes_in_whole_image_coordinates(easy_data_dir,
                                                                       tmp_path):
    # The last read is of a crop around the top-right quarter; its box (the middle fifth of
    # the crop) must come back mapped into the image, not as the crop's own fractions.
    reader = _FixedReads(image_size=(32, 64), box_head=True, char_boxes=True, zoom_steps=1,
                         zoom_margin=0.0)
    dm = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0,
                        cache_dir=str(tmp_path), unlabelled="test_a")
    dataset = dm.unlabelled_set()
    names, probs, boxes, confidence = read_unlabelled(reader, dataset, batch_size=8,
                                                      search=False, device=torch.device("cpu"))
    sizes = dataset.cache.original_sizes[dataset.cache_index]
    samples = pseudo_samples(names, probs, boxes, confidence, sizes, 0.5)
    assert len(samples) == len(names) == len(dataset)
    width, height = sizes[0]
    left, top, box_width, box_height = samples[0].boxes[0]
    # The crop spans x 0.5-1.0 and y 0.0-0.5 of the image: the middle fifth of it is x
    # 0.7-0.8, y 0.2-0.3; the crop's own fractions would say 0.4-0.6.
    np.testing.assert_allclose([left / width, top / height, box_width / width,
                                box_height / height], [0.7, 0.2, 0.1, 0.1], atol=0.02)


def test_an_answer_outvoted_in_the_search_is_not_sure():
    probs = _probs([5, 10, 10, 10, 10])
    agree = probs[:, None].repeat(1, 4, 1, 1)
    split = agree.clone()
    split[:, 2:] = _probs([6, 10, 10, 10, 10])[:, None]
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5]] * 4])
    alone = answer_confidence(probs)
    assert torch.allclose(answer_confidence(probs, agree, boxes), alone)
    assert answer_confidence(probs, split, boxes) < 0.6 * alone


# ------------------------------------------------------------------------ the round in a fit


def test_pseudo_labels_travel_with_the_checkpoint():
    callback = PseudoLabels(rounds=[0.5], threshold=0.8)
    callback.rounds_done = 1
    callback.samples = [Sample("a.png", (1, 2), ((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)))]
    restored = PseudoLabels()
    restored.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert restored.rounds_done == 1 and restored.samples == callback.samples


@pytest.mark.parametrize("rounds, threshold", [([0.0], 0.9), ([0.7, 0.5], 0.9), ([0.5], 0.0)])
def test_pseudo_label_settings_are_checked(rounds, threshold):
    with pytest.raises(SettingError, match="pseudo_labels"):
        PseudoLabels(rounds=rounds, threshold=threshold)


def _fit_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [*PLAIN_MODEL, "--data.data_dir", str(data_dir), "--data.cache_dir",
            str(root / "cache"), "--trainer.logger.init_args.save_dir", str(root / "runs"),
            "--data.num_workers", "0", "--data.batch_size", "32", "--data.max_len", "2",
            "--data.image_size", "[32, 64]", "--data.augment", "none",
            "--model.char_boxes", "true", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
            "false", *extra]


def test_a_round_trains_on_the_confident_readings_and_the_schedule_still_ends(
        easy_data_dir, tmp_path, caplog):
    # Threshold 0: every reading with a digit is a target, so the epochs after the round are
    # larger; the one-cycle schedule must still end with the last of them (an overflowing
    # OneCycleLR raises), and the run records what it learnt from.
    assert fit_main(_fit_args(easy_data_dir, tmp_path, "--trainer.max_epochs", "4",
                              "--model.scheduler", "onecycle", "--model.lr", "0.01",
                              "--data.unlabelled", "test_a", "--pseudo_labels.rounds",
                              "[0.5]", "--pseudo_labels.threshold", "0.001",
                              "--data.batch_size", "16", "--trainer.log_every_n_steps",
                              "1")) == 0
    assert "pseudo-labels, round 1 after epoch 2 of 4" in caplog.text
    run = next((tmp_path / "runs").glob("*/version_0"))
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["data"]["unlabelled"]["source"] == "test_a"
    assert summary["data"]["unlabelled"]["images"] == 20
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["pseudo/kept_share"].dropna().iloc[0] > 0.5
    rates = learning_rates(run / "metrics.csv", "lr-Adam")
    assert rates[-1] < 0.01 * max(rates)  # annealed to the end, not cut off mid-cycle
    # 300 labelled images in 19 batches of 16; after the round 300 + 20 in 20.
    steps = metrics.dropna(subset=["train/loss"]).groupby("epoch").size().tolist()
    assert steps == [19, 19, 20, 20]


def test_svhn_runs_shows_the_unlabelled_images_a_run_used(easy_data_dir, tmp_path, capsys):
    from svhn.analysis.runs import main as runs_main

    assert fit_main(_fit_args(easy_data_dir, tmp_path, "--trainer.max_epochs", "2",
                              "--data.unlabelled", "test_a")) == 0
    capsys.readouterr()
    assert runs_main([str(tmp_path / "runs"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["unlabelled"] == "test_a (20 images)"
    assert row["train_images"] == 300


def test_targets_of_pseudo_labelled_images_are_their_readings(easy_data_dir, tmp_path):
    dm = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0, max_len=2,
                        cache_dir=str(tmp_path), unlabelled="test_a", char_box_targets=True,
                        box_targets=True, augment="none")
    dm.prepare_data()
    dm.setup("fit")
    before = len(dm.train_set)
    samples = [Sample("000003.png", (7,), ((10.0, 5.0, 20.0, 30.0),))]
    dm.set_pseudo_labels(samples)
    assert len(dm.train_set) == before + 1
    item = dm.train_set[before]
    assert item["file_name"] == "000003.png"
    assert item["target"].tolist() == encode_label([7], 2)
    width, height = dm.unlabelled_set().cache.original_sizes[3]
    np.testing.assert_allclose(item["char_boxes"][0].numpy(),
                               [10 / width, 5 / height, 30 / width, 35 / height], atol=1e-5)
    dm.set_pseudo_labels([])  # the next round kept none: back to the labelled images
    assert len(dm.train_set) == before


# The generated set holds numbers of up to 5 digits; this test's readers read 2.
@pytest.mark.filterwarnings("ignore:.*synthetic_extra.*whose label is longer than max_len")
def test_pseudo_labels_can_take_the_place_of_the_generated_images(easy_data_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/synthetic_extra_12 is made here
    dm = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0, max_len=2,
                        cache_dir=str(tmp_path / "cache"), unlabelled="test_a",
                        char_box_targets=True, box_targets=True, augment="none",
                        synthetic_extra=12)
    dm.prepare_data()
    dm.setup("fit")
    labelled, generated = len(dm.train_set), dm.training_images["synthetic"]
    assert labelled == 300 + generated and generated > 0  # longer than max_len: left out
    samples = [Sample("000003.png", (7,), ((10.0, 5.0, 20.0, 30.0),))]
    dm.set_pseudo_labels(samples)  # keep: beside the generated images
    assert len(dm.train_set) == labelled + 1
    dm.set_pseudo_labels(samples, drop_synthetic=True)  # in their place
    assert len(dm.train_set) == 300 + 1
    assert f"{generated} generated (data.synthetic_extra) until the first pseudo-labels took " \
        "their place + 1 pseudo-labelled of test_a" in dm.training_images_text()
    dm.set_pseudo_labels([], drop_synthetic=True)  # a round that kept none: all back
    assert len(dm.train_set) == labelled
    with pytest.raises(SettingError, match="pseudo_labels.synthetic 'none'"):
        PseudoLabels(synthetic="none")


def test_a_reading_pass_told_to_stop_stops(easy_data_dir, tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    dm = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0, max_len=2,
                        cache_dir=str(tmp_path), unlabelled="test_a")
    reader = DigitReader(max_len=2, image_size=(32, 64))
    asked = []
    with pytest.raises(SIGTERMException):
        read_unlabelled(reader, dm.unlabelled_set(), batch_size=4, search=False,
                        device=torch.device("cpu"), stop=lambda: asked.append(1) or True)
    assert asked == [1]  # before the first batch


@pytest.fixture(scope="module")
def shifted_unlabelled_dir(tmp_path_factory) -> Path:
    """150 labelled images of one digit; 40 to validate on and 600 without labels (test A,
    their labels written apart, for scoring only) drawn smaller: unlabelled images framed
    unlike the labelled ones, as the competition's val and test images are framed wider
    than its train images."""
    smaller = {"digit_height": 18}
    return make_easy_dataset(tmp_path_factory.mktemp("shifted") / "mchar", most_digits=1,
                             counts={"train": 150, "val": 40, "test_a": 600},
                             looks={"val": smaller, "test_a": smaller})


def test_a_fit_learns_from_the_unlabelled_images(shifted_unlabelled_dir, tmp_path):
    # The teacher (the model half-way) reads the easier of the smaller digits surely; one
    # round of training on those readings, under augmentation, carries it to more of them.
    # The same fits without the unlabelled images read the 600 (whose labels no fit saw)
    # worse, at each of two seeds.
    from svhn.inference.cli import main as predict_main
    from svhn.inference.scoring import score_file

    data = shifted_unlabelled_dir

    def fit_and_read(name: str, seed: str, *extra: str) -> float:
        root = tmp_path / f"{name}_{seed}"
        assert fit_main(_fit_args(data, root, "--trainer.max_epochs", "20", "--model.lr",
                                  "0.01", "--data.max_len", "1", "--model.scheduler",
                                  "onecycle", "--data.augment", "baseline",
                                  "--seed_everything", seed, *extra)) == 0
        (last,) = root.glob("runs/*/version_0/checkpoints/last.ckpt")
        out = root / "test_a.csv"
        assert predict_main([str(last), "--data_dir", str(data), "--split", "test_a",
                             "--out", str(out), "--cache_dir", str(root / "cache"),
                             "--num_workers", "0", "--accelerator", "cpu"]) == 0
        return score_file(out, data / "mchar_test_a_labels.json").seq_acc

    for seed in ("42", "7"):
        alone = fit_and_read("labelled_only", seed)
        taught = fit_and_read("with_unlabelled", seed, "--data.unlabelled", "test_a",
                              "--pseudo_labels.rounds", "[0.5]",
                              "--pseudo_labels.threshold", "0.9")
        assert taught > alone + 0.005, (seed, alone, taught)


def test_a_later_round_that_would_eat_the_rest_of_the_budget_is_skipped(monkeypatch, caplog):
    from types import SimpleNamespace

    from svhn.train.time_budget import TimeBudget

    budget = TimeBudget(minutes=10)
    budget.planned_epochs, budget.epoch_seconds = 20, 30.0
    monkeypatch.setattr(budget, "seconds_left", lambda: 150.0)
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(hparams={"unlabelled": "test_a"}),  # nothing to read
        callbacks=[budget], should_stop=False, current_epoch=14, max_epochs=40)
    callback = PseudoLabels(rounds=[0.5, 0.75])
    callback.rounds_done, callback._pass_seconds = 1, 100.0
    callback.on_train_epoch_end(trainer, None)  # 150 s left < 100 s + two 30 s epochs
    assert callback.rounds_done == 2 and "round 2 skipped" in caplog.text
    callback.rounds_done, callback._pass_seconds = 1, 80.0
    with pytest.raises(AttributeError, match="unlabelled_set"):  # 150 >= 80 + 60: it reads
        callback.on_train_epoch_end(trainer, None)
