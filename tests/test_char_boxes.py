"""Per-digit boxes: from the labels, through both augmentation paths, into the reader's
``char_boxes`` head and its loss, learnt by a fit (the reader's use of them for zooming is
tested in test_reader.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from helpers.drawing import bright_extent, rectangles
from PIL import Image

from svhn.data.batch_augment import BatchAugment
from svhn.data.datamodule import SVHNDataModule
from svhn.data.labels import BLANK
from svhn.inference.checkpoints import load_reader
from svhn.model.training import digit_box_loss

MAX_LEN = 2  # the easy set's numbers have 1 or 2 digits


def easy_module(easy_data_dir: Path, cache_dir: Path, **kwargs) -> SVHNDataModule:
    kwargs = {"image_size": (32, 64), "max_len": MAX_LEN, "num_workers": 0,
              "box_targets": True, "char_box_targets": True, **kwargs}
    return SVHNDataModule(str(easy_data_dir), cache_dir=str(cache_dir), **kwargs)


def test_char_boxes_are_each_digit_s_box_in_reading_order_and_zero_at_blanks(
        easy_data_dir, tmp_path):
    labels = json.loads((easy_data_dir / "mchar_val.json").read_text())
    dataset = easy_module(easy_data_dir, tmp_path).dataset("val")
    for index in range(10):
        item = dataset[index]
        entry = labels[item["file_name"]]
        width, height = Image.open(easy_data_dir / "mchar_val" / item["file_name"]).size
        expected = np.zeros((MAX_LEN, 4), dtype=np.float32)
        for k in range(len(entry["label"])):
            left, top = entry["left"][k], entry["top"][k]
            expected[k] = (left / width, top / height, (left + entry["width"][k]) / width,
                           (top + entry["height"][k]) / height)
        np.testing.assert_allclose(item["char_boxes"].numpy(), expected, atol=1e-5)
        present = item["target"] != BLANK
        chars = item["char_boxes"][present]
        union = torch.cat([chars[:, :2].amin(0), chars[:, 2:].amax(0)])
        torch.testing.assert_close(union, item["box"], atol=1e-5, rtol=0)


def _grey_inside_and_around(image: torch.Tensor, box: torch.Tensor, union: torch.Tensor
                            ) -> tuple[float, float | None]:
    """Mean grey level inside a normalised box, and outside the union box (the background;
    None when the union box fills nearly all of the image)."""
    grey = image.float().mean(0)
    height, width = grey.shape
    ys = ((torch.arange(height) + 0.5) / height)[:, None]
    xs = (torch.arange(width) + 0.5) / width
    def mask(b):  # noqa: E306
        return (xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3])
    outside = ~mask(union)
    around = float(grey[outside].mean()) if outside.float().mean() > 0.1 else None
    return float(grey[mask(box)].mean()), around


def test_albumentations_moves_each_digit_box_with_the_image(easy_data_dir, tmp_path):
    dm = easy_module(easy_data_dir, tmp_path, augment="zoom_plain", augment_on="cpu",
                     cache_scale=2.0)
    dataset = dm.dataset("train", "zoom_plain")
    moved_any, checked = False, 0
    for index in range(40):
        item = dataset[index]
        unmoved = torch.from_numpy(dataset.char_boxes[index])
        for k in np.flatnonzero((item["target"] != BLANK).numpy()):
            box = item["char_boxes"][k]
            assert (box[2:] > box[:2]).all()  # zoom_plain crops keep every digit
            assert (box[:2] >= item["box"][:2] - 1e-3).all()
            assert (box[2:] <= item["box"][2:] + 1e-3).all()
            inside, around = _grey_inside_and_around(item["image"], box, item["box"])
            if around is not None:  # dark ink on a light ground: the box is on the digit
                checked += 1
                assert inside < around - 20, f"item {index} digit {k}: {box} is not on ink"
            moved_any |= not torch.allclose(box, unmoved[k], atol=0.02)
    assert moved_any, "zoom crops should move the digit boxes"
    assert checked > 10


def test_device_augmentation_moves_each_digit_box_with_the_image():
    torch.manual_seed(0)
    union = torch.tensor([[0.2, 0.3, 0.7, 0.8]]).repeat(32, 1)
    first = torch.tensor([[0.2, 0.3, 0.4, 0.8]]).repeat(32, 1)
    second = torch.tensor([[0.5, 0.35, 0.7, 0.75]]).repeat(32, 1)
    boxes = torch.stack([union, first, second], 1)
    # Only the second digit is bright: after augmentation its moved box must frame it.
    images = rectangles(second, (64, 128))
    out, moved = BatchAugment("zoom_plain", (32, 64), seed=3, backend="torch")(images, boxes)
    assert moved.shape == boxes.shape
    extent = bright_extent(out)
    # Corners of a rotated box bound it loosely; the bright pixels lie inside the moved box.
    slack = torch.tensor([2 / 64, 2 / 32, 2 / 64, 2 / 32])
    assert (extent[:, :2] >= moved[:, 2, :2] - slack[:2]).all()
    assert (extent[:, 2:] <= moved[:, 2, 2:] + slack[2:]).all()
    assert not torch.allclose(moved[:, 2], second, atol=0.02)


def test_gathered_batches_carry_digit_boxes_moved_on_the_device(easy_data_dir, tmp_path):
    dm = easy_module(easy_data_dir, tmp_path, augment="zoom_plain", augment_on="device",
                     cache_scale=2.0, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    blank_before = batch["char_boxes"][..., 2] <= batch["char_boxes"][..., 0]

    class Trainer:  # just what on_after_batch_transfer reads
        training, current_epoch, global_rank = True, 0, 0

    dm.trainer = Trainer()
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["image"].shape[-2:] == (32, 64)
    assert (out["char_boxes"][blank_before] == 0).all()  # blanks stay without a box
    present = ~blank_before
    for k in range(MAX_LEN):  # each digit's box lies inside the moved union box
        rows = present[:, k]
        assert (out["char_boxes"][rows, k, :2] >= out["box"][rows, :2] - 1e-4).all()
        assert (out["char_boxes"][rows, k, 2:] <= out["box"][rows, 2:] + 1e-4).all()


def test_digit_box_loss_counts_only_positions_that_hold_a_known_digit():
    true = torch.tensor([[[0.1, 0.1, 0.4, 0.9], [0.5, 0.1, 0.9, 0.9], [0, 0, 0, 0]]])
    targets = torch.tensor([[3, 7, BLANK]])
    predicted = true.clone()
    predicted[0, 2] = torch.tensor([0.9, 0.9, 0.1, 0.1])  # wrong, but at a blank
    assert digit_box_loss(predicted, true, targets) == 0
    predicted[0, 1, 0] += 0.2
    off_by_one = digit_box_loss(predicted, true, targets)
    assert off_by_one > 0
    unknown = true.clone()
    unknown[0, 1] = 0  # cropped away: no box to learn from
    assert digit_box_loss(predicted, unknown, targets) == 0
    assert digit_box_loss(predicted, true, torch.full_like(targets, -100)) == 0


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    low, high = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _digit_box_iou(run, cache_dir: Path) -> float:
    """Mean IoU of the last checkpoint's digit boxes with the true ones over the easy val
    set, at the positions that hold a digit (whole-image read and one zoom step)."""
    reader = load_reader(run.last).eval()
    val = easy_module(run.data_dir, cache_dir, eval_scale=2.0).dataset("val")
    batch = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        out = reader(torch.stack([item["image"] for item in batch]))
    true = torch.stack([item["char_boxes"] for item in batch])
    targets = torch.stack([item["target"] for item in batch])
    return float(_iou(out["char_boxes"], true)[targets != BLANK].mean())


def test_a_fit_with_digit_boxes_learns_where_each_digit_stands(easy_data_dir, easy_fit,
                                                               tmp_path):
    def fit(name: str, *extra: str):
        return easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / name,
                        "--model.lr", "0.003", "--data.image_size", "[32, 64]",
                        "--data.augment", "zoom_plain", "--data.cache_scale", "2",
                        "--data.eval_scale", "2", "--model.box_head", "true",
                        "--model.char_boxes", "true", "--model.zoom_from", "digits",
                        "--model.zoom_steps", "1", "--model.feature_grid", "[2, 4]",
                        "--trainer.max_epochs", "6", *extra)

    run = fit("supervised")
    metrics = pd.read_csv(run.metrics)
    assert {"train/char_box_loss", "val/char_box_loss"} <= set(metrics)
    assert 0 < run.best_score <= 1
    reader = load_reader(run.last)
    assert reader.zoom_from == "digits" and reader.char_box_regressor is not None
    unsupervised = fit("unsupervised", "--model.char_box_loss_weight", "0")
    learnt = _digit_box_iou(run, tmp_path / "val_cache")
    untaught = _digit_box_iou(unsupervised, tmp_path / "val_cache")
    # The same run without the digit-box loss leaves the head's boxes off the digits.
    assert learnt > 0.35 and learnt > untaught + 0.15, (learnt, untaught)


def test_without_char_box_targets_the_digit_boxes_are_not_known(easy_data_dir, tmp_path):
    # A model without the digit-box head: albumentations is spared the extra boxes, and
    # zeros ("not known") cannot teach anything wrong.
    dm = easy_module(easy_data_dir, tmp_path, char_box_targets=False, augment="zoom_plain",
                     augment_on="cpu", cache_scale=2.0)
    for dataset in (dm.dataset("val"), dm.dataset("train", "zoom_plain"),
                    dm.dataset("train", "zoom_plain", gather_only=True)):
        item = dataset[0]
        assert (item["char_boxes"] == 0).all()
        assert (item["box"][2:] > item["box"][:2]).all()
