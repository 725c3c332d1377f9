"""Augmentation presets (albumentations) from cached uint8 images to normalised tensors.

Every preset ends at ``image_size`` with the same normalisation, so training, validation and
prediction all feed the model the same kind of tensor. The union box of the digits travels
through each transform as a normalised (x0, y0, x1, y1) box, for models with a box head.

Presets:
- ``none``: resize only (evaluation and prediction use this).
- ``baseline``: the competition tutorial's recipe: resize 64x128, random crop 60x120 (here a
  15/16 crop resized back to ``image_size``), colour jitter, rotation +-10 degrees.
- ``strong``: baseline plus affine (scale, shift, shear), blur, noise, grey and inversion.
- ``zoom``: crop-jitter around the digits (a random crop that keeps every digit, from tight
  to the whole image), plus ``strong``'s photometric changes. Teaches a reader to read any
  framing of the number, which two-pass "zoom" prediction relies on.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("none", "baseline", "strong", "zoom")
TUTORIAL_CROP = 15 / 16  # 60x120 out of 64x128


def _photometric(strength: float) -> list[A.BasicTransform]:
    jitter = A.ColorJitter(
        brightness=0.3 * strength, contrast=0.3 * strength, saturation=0.2 * strength,
        hue=0.05 * strength, p=0.8,
    )
    if strength <= 1:
        return [jitter]
    return [
        jitter,
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=0.25),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.2),
        A.ToGray(p=0.1),
        A.InvertImg(p=0.1),  # light-on-dark and dark-on-light numbers both occur
    ]


def _geometric(preset: str, height: int, width: int) -> list[A.BasicTransform]:
    resize = A.Resize(height, width, interpolation=cv2.INTER_LINEAR)
    if preset == "none":
        return [resize]
    if preset == "baseline":
        crop = A.RandomCrop(round(height * TUTORIAL_CROP), round(width * TUTORIAL_CROP))
        return [resize, crop, A.Resize(height, width),
                A.Rotate(limit=10, border_mode=cv2.BORDER_REPLICATE, p=1.0)]
    if preset == "strong":
        return [resize, A.Affine(scale=(0.85, 1.1), translate_percent=(-0.06, 0.06),
                                 rotate=(-10, 10), shear=(-8, 8),
                                 border_mode=cv2.BORDER_REPLICATE, p=0.9)]
    if preset == "zoom":
        return [A.RandomSizedBBoxSafeCrop(height, width, p=0.75), resize,
                A.Affine(scale=(0.9, 1.05), translate_percent=(-0.03, 0.03), rotate=(-8, 8),
                         shear=(-6, 6), border_mode=cv2.BORDER_REPLICATE, p=0.7)]
    raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}.")


def build_transform(preset: str, image_size: tuple[int, int]) -> A.Compose:
    """The albumentations pipeline for a preset; call with image=uint8 HWC, bboxes=[box]."""
    height, width = image_size
    strength = {"none": 0.0, "baseline": 1.0, "strong": 1.5, "zoom": 1.5}.get(preset, 0.0)
    steps = _geometric(preset, height, width)
    if strength > 0:
        steps += _photometric(strength)
    steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="albumentations", label_fields=["box_labels"],
                                 clip=True, min_visibility=0.0),
        seed=None,
    )
