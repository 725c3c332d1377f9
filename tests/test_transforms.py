"""The albumentations presets: output contract, the box through each geometric change,
the zoom preset's crops around the digits, and seeding."""

import numpy as np
import pytest
import torch

from svhn.data.transforms import (
    PRESETS,
    ZOOM_CROP_MARGIN,
    build_transform,
    needs_box,
    zoom_crop_target,
)

BOX = np.array([0.30, 0.25, 0.60, 0.75], dtype=np.float32)  # x0, y0, x1, y1 of the digits


def digits_image(height: int = 96, width: int = 192) -> np.ndarray:
    """A dark image with a bright block exactly where BOX is."""
    image = np.full((height, width, 3), 20, dtype=np.uint8)
    x0, y0, x1, y1 = (BOX * [width, height, width, height]).round().astype(int)
    image[y0:y1, x0:x1] = 235
    return image


def run(preset: str, seed: int, image: np.ndarray | None = None):
    transform = build_transform(preset, (32, 64), with_box=True)
    transform.set_random_seed(seed)
    image = digits_image() if image is None else image
    extra = zoom_crop_target(BOX, image.shape) if needs_box(preset) else {}
    return transform(image=image, bboxes=[BOX], box_labels=[0], **extra)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_ends_as_a_uint8_chw_tensor_at_the_image_size(preset):
    out = run(preset, seed=0)
    assert isinstance(out["image"], torch.Tensor)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 32, 64)


def test_none_only_resizes_and_keeps_the_box():
    out = run("none", seed=0)
    np.testing.assert_allclose(out["bboxes"][0], BOX, atol=1e-6)


@pytest.mark.parametrize("preset", ["baseline", "strong", "zoom"])
def test_the_box_still_bounds_the_digits_after_augmentation(preset):
    # Colour changes may invert or grey the image, so the block is whichever side of the
    # mid-grey threshold lies inside the moved box; a box that missed would hold neither.
    for seed in range(8):
        out = run(preset, seed)
        image = out["image"].float().mean(0).numpy()
        bright = image > (image.min() + image.max()) / 2
        x0, y0, x1, y1 = np.asarray(out["bboxes"][0]) * [64, 32, 64, 32]
        rows, cols = np.indices(image.shape)
        in_box = (cols >= x0 - 2) & (cols <= x1 + 1) & (rows >= y0 - 2) & (rows <= y1 + 1)
        block = max((bright, ~bright), key=lambda mask: in_box[mask].mean())
        assert in_box[block].mean() > 0.95, (preset, seed)
        assert block.sum() > 0.6 * (x1 - x0) * (y1 - y0), (preset, seed)  # and fills it


def test_zoom_crops_grow_the_digits_box_by_the_margin():
    target = zoom_crop_target(BOX, (100, 200))["digits_box"]
    grow_x, grow_y = 0.30 * ZOOM_CROP_MARGIN, 0.50 * ZOOM_CROP_MARGIN
    assert target == [round((0.30 - grow_x) * 200), round((0.25 - grow_y) * 100),
                      round((0.60 + grow_x) * 200), round((0.75 + grow_y) * 100)]
    edge = zoom_crop_target([0.0, 0.0, 1.0, 1.0], (100, 200))["digits_box"]
    assert edge == [0, 0, 200, 100]  # clipped to the image


def test_zoom_mostly_makes_the_digits_larger():
    boxes = [np.asarray(run("zoom", seed)["bboxes"][0]) for seed in range(40)]
    widths = [box[2] - box[0] for box in boxes]
    assert np.median(widths) > (BOX[2] - BOX[0]) * 1.3  # crops around the digits


def test_seeded_presets_repeat_and_different_seeds_differ():
    first, again, other = run("strong", 3), run("strong", 3), run("strong", 4)
    assert torch.equal(first["image"], again["image"])
    assert not torch.equal(first["image"], other["image"])


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown augmentation preset 'wild'"):
        build_transform("wild", (32, 64))
