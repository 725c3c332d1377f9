"""Augmentation presets (albumentations) from cached uint8 images to uint8 tensors.

Every preset ends at ``image_size`` as a uint8 (3, H, W) tensor; the reader normalises on its
own device (``svhn.model.reader.DigitReader.normalize``), so workers send 4x fewer bytes and
skip a float pass. With ``with_box`` the union box of the digits travels through the transform as a
normalised (x0, y0, x1, y1) box. Box bookkeeping costs more than the augmentation itself on
these small images, so it is only switched on where the box moves and is needed.

Presets:
- ``none``: resize only (evaluation and prediction use this).
- ``baseline``: the competition tutorial's recipe: resize 64x128, random crop 60x120,
  colour jitter (brightness 0.3, contrast 0.3, saturation 0.2), rotation +-10 degrees. The
  crop (as a 16/15 zoom with a shift of up to 1/32) and the rotation are one affine warp.
- ``strong``: baseline plus affine (scale, shift, shear), blur, noise, grey and inversion.
- ``zoom``: crop-jitter around the digits, plus ``strong``'s photometric changes: mostly a
  tight crop (the digits' box grown by ZOOM_CROP_MARGIN per side, each edge moved at random),
  else a random crop that keeps every digit (tight to whole image), else the whole image.
  Teaches one model both to find the number in a whole image and to read it from the crop
  that "zoom" prediction cuts around each predicted box.
- ``zoom_plain``: ``zoom``'s crops and warp without the photometric changes: for the
  synthetic quick-start set, whose train and val images come from one generator; it learns
  several times faster there (measured: docs/performance.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

# No network call on import: albumentations asks PyPI for a newer version each time it is
# imported, which on an offline machine (a GPU node, say) waits up to 2 s and prints a
# warning in every command. Set it to 0 to have the check back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
from albumentations.pytorch import ToTensorV2

from svhn.errors import SettingError
from svhn.geometry import grow_box

__all__ = ["AFFINE", "AffineRange", "build_transform", "colour_range", "ColourRange",
           "needs_box", "PRESETS", "ZOOM_CROP_JITTER", "ZOOM_CROP_MARGIN", "ZOOM_CROP_P",
           "zoom_crop_target", "ZOOM_NEAR_P", "ZOOM_PRESETS"]

PRESETS = ("none", "baseline", "strong", "zoom", "zoom_plain")
ZOOM_PRESETS = ("zoom", "zoom_plain")  # crop around the digits: they need the digits' box
_TUTORIAL_ZOOM = 16 / 15  # a 60x120 crop of 64x128 shown at 64x128
_TUTORIAL_SHIFT = 1 / 32  # the crop's offset: up to 2 of 64 pixels each way
ZOOM_CROP_MARGIN = 0.15  # tight zoom crops: the box grown by 15 % of its size per side...
ZOOM_CROP_JITTER = 0.1  # ...each edge moved by up to 10 % of that crop: digits stay inside
ZOOM_CROP_P = 0.8  # zoom: a crop at all (else the whole image)...
ZOOM_NEAR_P = 0.6  # ...and of the crops, this share tight around the digits (else box-safe)


@dataclass(frozen=True)
class AffineRange:
    """A preset's random affine: scale (min, max; x and y drawn apart), shift (a fraction of
    the image size, either way), rotation and shear (degrees, either way; shear drawn for x
    and y apart) and its probability. ``svhn.data.batch_augment`` reads the same ranges."""

    scale: tuple[float, float]
    shift: float
    rotate: float
    shear: float
    p: float


@dataclass(frozen=True)
class ColourRange:
    """A preset's photometric changes: colour jitter (brightness, contrast and saturation
    factors within 1 +- the value, hue shift within +- the value of a full turn) with
    probability ``jitter_p``; blur, Gaussian noise (std as a fraction of 255), grey and
    inversion with their probabilities (0: not in the preset)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_p: float = 1.0
    blur_p: float = 0.0
    noise_std: tuple[float, float] = (0.02, 0.08)
    noise_p: float = 0.0
    gray_p: float = 0.0
    invert_p: float = 0.0


AFFINE = {
    "baseline": AffineRange((_TUTORIAL_ZOOM, _TUTORIAL_ZOOM), _TUTORIAL_SHIFT, 10, 0, 1.0),
    "strong": AffineRange((0.85, 1.1), 0.06, 10, 8, 0.9),
    "zoom": AffineRange((0.9, 1.05), 0.03, 8, 6, 0.7),
}
AFFINE["zoom_plain"] = AFFINE["zoom"]  # zoom's geometry without its colour changes


def colour_range(preset: str) -> ColourRange | None:
    """The photometric ranges of a preset (None for ``none``)."""
    strength = {"baseline": 1.0, "strong": 1.5, "zoom": 1.5}.get(preset, 0.0)
    if strength <= 0:
        return None
    if strength <= 1:  # the tutorial's jitter has no hue (a costly HSV round trip)
        return ColourRange(0.3, 0.3, 0.2, 0.0)
    return ColourRange(0.3 * strength, 0.3 * strength, 0.2 * strength, 0.05 * strength,
                       jitter_p=0.8, blur_p=0.25, noise_p=0.2, gray_p=0.1, invert_p=0.1)


def _photometric(colour: ColourRange) -> list[A.BasicTransform]:
    jitter = A.ColorJitter(brightness=colour.brightness, contrast=colour.contrast,
                           saturation=colour.saturation, hue=colour.hue, p=colour.jitter_p)
    if not colour.blur_p:
        return [jitter]
    return [
        jitter,
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))],
                p=colour.blur_p),
        A.GaussNoise(std_range=colour.noise_std, p=colour.noise_p),
        A.ToGray(p=colour.gray_p),
        A.InvertImg(p=colour.invert_p),  # light-on-dark and dark-on-light numbers both occur
    ]


def _affine(preset: str) -> A.Affine:
    r = AFFINE[preset]
    return A.Affine(scale=r.scale, translate_percent=(-r.shift, r.shift),
                    rotate=(-r.rotate, r.rotate), shear=(-r.shear, r.shear),
                    border_mode=cv2.BORDER_REPLICATE, p=r.p)


def _geometric(preset: str, height: int, width: int) -> list[A.BasicTransform]:
    resize = A.Resize(height, width, interpolation=cv2.INTER_LINEAR)
    if preset == "none":
        return [resize]
    if preset in ("baseline", "strong"):
        return [resize, _affine(preset)]
    if preset in ZOOM_PRESETS:
        crops = A.OneOf([
            A.RandomCropNearBBox(max_part_shift=ZOOM_CROP_JITTER,
                                 cropping_bbox_key="digits_box", p=ZOOM_NEAR_P),
            A.RandomSizedBBoxSafeCrop(height, width, p=1 - ZOOM_NEAR_P),
        ], p=ZOOM_CROP_P)
        return [crops, resize, _affine(preset)]
    raise SettingError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}.")


def zoom_crop_target(box: Sequence[float], image_shape: tuple[int, ...]) -> dict:
    """The extra input of the zoom preset: the digits' box grown by ZOOM_CROP_MARGIN, in
    pixels of the image about to be transformed."""
    height, width = image_shape[:2]
    x0, y0, x1, y1 = grow_box(box, ZOOM_CROP_MARGIN)
    return {"digits_box": [round(x0 * width), round(y0 * height), round(x1 * width),
                           round(y1 * height)]}


def needs_box(preset: str) -> bool:
    """The zoom presets crop around the digits, so they always need their box."""
    return preset in ZOOM_PRESETS


def build_transform(preset: str, image_size: tuple[int, int], with_box: bool = False
                    ) -> A.Compose:
    """The pipeline for a preset: call with image=uint8 HWC (and, with ``with_box``,
    bboxes=[box], box_labels=[0]); returns a uint8 (3, H, W) tensor."""
    height, width = image_size
    steps = _geometric(preset, height, width)
    colour = colour_range(preset)
    if colour is not None:
        steps += _photometric(colour)
    steps.append(ToTensorV2())
    if not (with_box or needs_box(preset)):
        return A.Compose(steps, seed=None)
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="albumentations", label_fields=["box_labels"],
                                 clip=True, min_visibility=0.0),
        seed=None,
    )
