"""The digit detector (``head: detector``): its targets, its decoding into the reading's
positions, its place in the reader, and that its loss is what teaches it to find digits."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import write_model_checkpoint
from torch.utils.data import DataLoader

from svhn.data.datamodule import SVHNDataModule
from svhn.data.labels import BLANK, canonical_predictions
from svhn.errors import SettingError
from svhn.model.detector import decode_detections, detection_loss, detection_targets
from svhn.model.metrics import whole_string_correct
from svhn.model.reader import DigitReader

GRID = (4, 8)  # (rows, cols) of the map in these tests
TINY = "resnet10t"  # a timm ResNet small enough to train in a test


def _boxes(*boxes):
    """(1, 5, 4) char boxes: the given ones, zeros (unknown) after."""
    rows = list(boxes) + [(0.0, 0.0, 0.0, 0.0)] * (5 - len(boxes))
    return torch.tensor([rows])


def _targets(*digits):
    return torch.tensor([list(digits) + [BLANK] * (5 - len(digits))])


def _cell(box, grid=GRID):
    """The (row, col) of the cell holding a box's centre, and its flat index."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row, col = int(cy * grid[0]), int(cx * grid[1])
    return row, col, row * grid[1] + col


# ------------------------------------------------------------------------------ targets


def test_each_digit_is_learnt_at_the_cell_of_its_centre_with_its_class_and_its_box():
    three, seven = (0.10, 0.20, 0.30, 0.80), (0.60, 0.10, 0.90, 0.90)
    wanted = detection_targets(_boxes(three, seven), _targets(3, 7), GRID)
    assert wanted["classes"].shape == (1, 10, *GRID)
    for box, digit in ((three, 3), (seven, 7)):
        row, col, flat = _cell(box)
        assert wanted["positive"][0, flat]
        assert wanted["classes"][0, :, row, col].tolist() == [float(d == digit) for d in range(10)]
        torch.testing.assert_close(wanted["boxes"][0, flat], torch.tensor(box))
    # Far from both digits (the top-right corner is outside both boxes' centre regions)
    # and between them: nothing to learn.
    assert not wanted["positive"][0, 0 * GRID[1] + 0]
    assert wanted["classes"][0, :, 0, 0].sum() == 0
    # Every positive cell is within 1.5 cells of its digit's centre.
    assert wanted["positive"].sum() <= 2 * 9


def test_a_digit_smaller_than_a_cell_still_has_its_cell_and_blanks_teach_nothing():
    speck = (0.52, 0.40, 0.54, 0.45)  # inside one cell, centred on no cell centre
    wanted = detection_targets(_boxes(speck), _targets(9), GRID)
    assert wanted["positive"].sum() == 1
    assert wanted["positive"][0, _cell(speck)[2]]
    # A blank position, an unlabelled one and one whose box was cropped away (zero width)
    # teach nothing, whatever its box says.
    nothing = detection_targets(
        _boxes((0.1, 0.1, 0.4, 0.9), (0.5, 0.1, 0.8, 0.9), (0.5, 0.5, 0.5, 0.9)),
        torch.tensor([[BLANK, -1, 4, BLANK, BLANK]]), GRID)
    assert not nothing["positive"].any() and nothing["classes"].sum() == 0


def test_a_cell_two_digits_claim_learns_the_nearer_one():
    left, right = (0.30, 0.1, 0.50, 0.9), (0.45, 0.1, 0.65, 0.9)  # overlapping boxes
    wanted = detection_targets(_boxes(left, right), _targets(1, 2), GRID)
    for box, digit in ((left, 1), (right, 2)):
        row, col, _ = _cell(box)
        assert wanted["classes"][0, digit, row, col] == 1
        assert wanted["classes"][0].sum((1, 2)).gt(0).sum() == 2  # only these two classes
    assert wanted["classes"].sum(1).max() == 1  # one digit per cell


def test_the_loss_is_lower_for_a_head_that_says_what_the_targets_say():
    boxes, targets = _boxes((0.10, 0.20, 0.30, 0.80)), _targets(3)
    wanted = detection_targets(boxes, targets, GRID)
    right = {"class_logits": (wanted["classes"] * 16 - 8),
             "box_distances": torch.full((1, 4, *GRID), 1.0)}
    wrong = {"class_logits": torch.roll(right["class_logits"], 1, dims=1),
             "box_distances": right["box_distances"]}
    good, bad = detection_loss(right, boxes, targets), detection_loss(wrong, boxes, targets)
    assert good["class_loss"] < bad["class_loss"] / 10
    # With no digit anywhere the box loss is zero but stays in the graph.
    blank = {key: value.clone().requires_grad_() for key, value in right.items()}
    empty = detection_loss(blank, _boxes(), _targets())
    assert empty["box_loss"] == 0 and empty["box_loss"].requires_grad


# ----------------------------------------------------------------------------- decoding


def _scene(found: list[tuple[int, int, int, float]], grid=GRID, reach: float = 1.0):
    """A head output with digit ``d`` scored ``s`` at cell (row, col) for each (row, col,
    d, s) and nothing elsewhere; every cell's box reaches ``reach`` cells each side."""
    logits = torch.full((1, 10, *grid), -12.0)
    for row, col, digit, score in found:
        logits[0, digit, row, col] = torch.logit(torch.tensor(score))
    return {"class_logits": logits, "box_distances": torch.full((1, 4, *grid), reach)}


def _reading(detection, max_len=5, threshold=0.25):
    probs = decode_detections(detection, max_len, threshold)["probs"]
    return [d for d in probs.argmax(-1)[0].tolist() if d != BLANK], probs


def test_digits_are_read_left_to_right_whatever_their_scores():
    digits, probs = _reading(_scene([(1, 6, 5, 0.95), (2, 1, 2, 0.60), (1, 3, 8, 0.80)]))
    assert digits == [2, 8, 5]
    assert probs.shape == (1, 5, 11)
    assert probs.argmax(-1)[0, 3:].tolist() == [BLANK, BLANK]  # digits first, blanks after
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 5))


def test_one_digit_found_by_neighbouring_cells_is_read_once():
    # Two cells side by side see the same 4; their boxes (1.5 cells each side) overlap.
    digits, _ = _reading(_scene([(1, 3, 4, 0.9), (1, 4, 4, 0.8), (2, 3, 4, 0.7)], reach=1.5))
    assert digits == [4]
    # ... even when the weaker one thinks it is another digit (class-agnostic NMS).
    digits, _ = _reading(_scene([(1, 3, 6, 0.9), (1, 4, 9, 0.8)], reach=1.5))
    assert digits == [6]


def test_at_most_max_len_digits_the_most_confident_ones():
    scene = _scene([(1, col, col, 0.3 + 0.08 * col) for col in range(8)], reach=0.4)
    digits, _ = _reading(scene, max_len=5)
    assert digits == [3, 4, 5, 6, 7]


def test_an_image_with_no_digit_found_reads_blank_and_answers_its_likeliest_digit():
    digits, probs = _reading(_scene([(1, 2, 7, 0.10), (2, 5, 1, 0.05)]))
    assert digits == []
    assert canonical_predictions(probs)[0, 0] == 7  # the submission is never empty
    # The threshold decides: just above it the same cell is a digit.
    assert _reading(_scene([(1, 2, 7, 0.26)]))[0] == [7]
    assert _reading(_scene([(1, 2, 7, 0.24)]))[0] == []


def test_a_more_confident_detection_gives_a_more_confident_reading():
    sure = _reading(_scene([(1, 2, 7, 0.9)]))[1][0, 0].amax()
    unsure = _reading(_scene([(1, 2, 7, 0.4)]))[1][0, 0].amax()
    assert sure > unsure > 0.5


# ------------------------------------------------------------------------ in the reader


def _detector(**kwargs) -> DigitReader:
    settings = {"backbone": TINY, "image_size": (32, 64), "max_len": 2, "box_head": True,
                "char_boxes": True, "head": "detector", **kwargs}
    return DigitReader(**settings)


def test_the_detector_reads_like_the_heads_in_training_and_through_a_zoom_search():
    images = torch.randint(0, 256, (3, 3, 64, 128), dtype=torch.uint8)
    reader = _detector(zoom_steps=2, zoom_from="digits", zoom_search=True).train()
    out = reader(images)
    assert out["logits"].shape == (3, 2, 11) and out["char_boxes"].shape == (3, 2, 4)
    assert out["detection"]["class_logits"].shape == (3, 10, 4, 8)  # stride 8 at 32x64
    with torch.no_grad():
        searched = reader.eval()(images)
    assert searched["logits"].shape == (3, 2, 11)
    assert searched["chain_logits"].shape == (3, 29, 2, 11)


def test_the_detector_s_width_is_a_setting_a_checkpoint_keeps(tmp_path):
    """``detector_width`` narrows the head with a narrowed backbone (configs/real_cpu.yaml's);
    svhn.predict rebuilds it at the width it was trained at (older checkpoints: 96)."""
    from svhn.inference.checkpoints import load_reader
    from svhn.model.training import DigitSequenceModel

    assert _detector().detector.tower[0].out_channels == 96
    settings = {"backbone": TINY, "image_size": (32, 64), "max_len": 2, "box_head": True,
                "char_boxes": True, "head": "detector", "detector_width": 16}
    model = DigitSequenceModel(**settings)
    tower = model.reader.detector.tower
    assert [tower[i].out_channels for i in (0, 3)] == [16, 16]
    reader = load_reader(write_model_checkpoint(tmp_path / "narrow_head.ckpt", model))
    assert reader.detector.tower[3].out_channels == 16
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.reader.eval()(images, search=False)["logits"]
        assert torch.equal(reader.eval()(images, search=False)["logits"], expected)


@pytest.mark.parametrize("settings, words", [
    ({"backbone": "simple_cnn"}, "timm CNN backbone"),
    ({"char_boxes": False}, "char_boxes: true"),
    ({"head": "boxes"}, "choose one of"),
    ({"detect_threshold": 1.0}, "(0, 1)"),
    ({"detector_width": 0}, "at least 1"),
])
def test_a_detector_that_cannot_work_is_refused_with_the_fix(settings, words):
    with pytest.raises(SettingError, match=None) as error:
        _detector(**settings)
    assert words in str(error.value)


# --------------------------------------------------------------------- training signal


def _train(reader: DigitReader, loader: DataLoader, steps: int, detection: bool) -> None:
    optimiser = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    reader.train()
    batches = iter(())
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        out = reader(batch["image"])
        loss = torch.nn.functional.smooth_l1_loss(out["box"], batch["box"])
        if detection:
            parts = detection_loss(out["detection"], batch["char_boxes"], batch["target"])
            loss = loss + parts["class_loss"] + parts["box_loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def _accuracy(reader: DigitReader, loader: DataLoader) -> float:
    reader.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            probs = reader(batch["image"])["logits"].softmax(-1)
            right += int(whole_string_correct(probs, batch["target"]).sum())
            total += len(probs)
    return right / total


@pytest.mark.slow  # two fits, a minute on a 2-core CPU: CI runs it with the slow tests
def test_a_short_fit_finds_digits_with_the_detection_loss_and_not_without_it(
        easy_data_dir, tmp_path):
    data = SVHNDataModule(str(easy_data_dir), cache_dir=str(tmp_path), image_size=(32, 64),
                          max_len=2, num_workers=0, batch_size=32, augment="none",
                          box_targets=True, char_box_targets=True)
    data.setup("fit")
    train = data.train_dataloader()
    scores = {}
    for detection in (True, False):
        torch.manual_seed(0)
        reader = _detector()
        _train(reader, train, steps=160, detection=detection)
        scores[detection] = _accuracy(reader, train)
    # The same steps, the same backbone updates (the box head's loss), but only the fit
    # with the detection loss learns where the digits are and what they are.
    assert scores[True] >= 0.5, scores
    assert scores[False] <= 0.15, scores


def test_the_sync_free_nms_keeps_what_torchvision_s_batched_nms_keeps():
    from torchvision.ops import batched_nms

    from svhn.model.detector import _greedy_nms

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(6, 12, 2, generator=generator) * 0.7
    boxes = torch.cat([corners, corners + 0.1 + torch.rand(6, 12, 2, generator=generator) * 0.3],
                      -1)
    scores = torch.rand(6, 12, generator=generator).sort(1, descending=True).values
    kept = _greedy_nms(boxes, 0.45)
    expected = torch.zeros(6 * 12, dtype=torch.bool)
    expected[batched_nms(boxes.flatten(0, 1), scores.flatten(),
                         torch.arange(6).repeat_interleave(12), 0.45)] = True
    assert torch.equal(kept, expected.view(6, 12))
    assert 0 < kept.sum() < kept.numel()  # some kept, some dropped: the case is not trivial
