"""Synthetic house-number images in the competition's exact file layout.

``python -m svhn.synthetic --out DIR --n 1000 --seed 0`` writes::

    DIR/mchar_train/000000.png ...      DIR/mchar_train.json
    DIR/mchar_val/000000.png ...        DIR/mchar_val.json
    DIR/mchar_test_a/000000.png ...     DIR/mchar_test_a_labels.json   (synthetic only!)
    DIR/mchar_sample_submit_A.csv       DIR/SYNTHETIC_DATASET.txt      (marker + parameters)

The JSON files use the competition format: ``{"000000.png": {"label": [1, 9], "left": [...],
"top": [...], "width": [...], "height": [...]}}``, one list element per digit, left to right,
each box the true axis-aligned bounding box of that digit's ink in the final image.
``mchar_test_a_labels.json`` does not exist in the real competition: it is written here so that
predict/score tools can be tested end to end.

Images imitate SVHN crops cheaply: varied fonts, colours, textured walls, plates, shadows,
outlines, slight rotation/shear/perspective, blur, noise, JPEG artefacts, digits cut at the
image edges as distractors, and digits covering only part of a variably sized image.
Every image draws from its own RNG ``np.random.default_rng([seed, split_index, i])``, so the
output for a seed is byte-identical however it is produced (given the same fonts and Pillow).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from svhn.errors import OutputExistsError, SettingError, command

__all__ = ["available_fonts", "Box", "Colour", "generate_dataset", "main", "MARKER_NAME",
           "MAX_SUPPORTED_DIGITS", "render_number", "sample_digits", "SPLITS", "SUBMIT_NAME",
           "TEST_LABELS_NAME"]

SPLITS = ("mchar_train", "mchar_val", "mchar_test_a")
TEST_LABELS_NAME = "mchar_test_a_labels.json"
SUBMIT_NAME = "mchar_sample_submit_A.csv"
MARKER_NAME = "SYNTHETIC_DATASET.txt"
MAX_SUPPORTED_DIGITS = 8

Box = tuple[int, int, int, int]  # (left, top, width, height) in pixels
Colour = tuple[int, int, int]

# Share of label lengths in the real training set (1..5 digits); longer ones are very rare.
_LENGTH_WEIGHTS = (0.15, 0.54, 0.26, 0.04, 0.01, 0.003, 0.001, 0.001)

# Typical house-number colours: paints, metals, plates, walls.
_PALETTE: tuple[Colour, ...] = (
    (20, 20, 20),
    (240, 240, 238),
    (185, 145, 70),
    (205, 170, 85),
    (170, 172, 178),
    (75, 55, 40),
    (165, 35, 35),
    (30, 45, 95),
    (35, 75, 45),
    (35, 80, 160),
    (150, 75, 55),
    (215, 200, 170),
    (128, 128, 128),
    (240, 230, 200),
    (215, 185, 50),
    (95, 95, 100),
    (200, 205, 210),
    (110, 80, 60),
)

# Fonts whose "0".."9" are ordinary lining digits (cmsy/cmex/STIXSize map symbols there).
_MATPLOTLIB_FONT_PREFIXES = ("DejaVu", "STIXGeneral", "cmr10", "cmb10", "cmss10", "cmtt10",
                             "cmti10")
_SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts")
_SYSTEM_FONT_SKIP = ("math", "symbol", "emoji", "icon", "dingbat", "extralight")

_DISTRACTOR_CHARS = "0123456789ABCDEFGHKLMNPRSTUVWXYZ"
_MIN_DIGIT_PIXELS = 10  # output digit height floor; real SVHN digits are rarely smaller
_INK_THRESHOLD = 96  # mask value counted as ink when measuring boxes (drops faint anti-aliasing)


# --------------------------------------------------------------------------- fonts


def _matplotlib_font_paths() -> list[Path]:
    import matplotlib  # only for its bundled fonts

    ttf_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [p for p in ttf_dir.glob("*.ttf") if p.name.startswith(_MATPLOTLIB_FONT_PREFIXES)]


def _system_font_paths() -> list[Path]:
    paths = []
    for root in _SYSTEM_FONT_DIRS:
        for pattern in ("*.ttf", "*.otf"):
            paths.extend(Path(root).rglob(pattern) if Path(root).is_dir() else [])
    return [p for p in paths if not any(s in p.name.lower() for s in _SYSTEM_FONT_SKIP)]


def _draws_distinct_digits(path: Path) -> bool:
    """Reject fonts lacking digits (they render empty boxes or the same .notdef glyph)."""
    try:
        font = ImageFont.truetype(str(path), 40)
        masks = [bytes(font.getmask(str(d))) for d in range(10)]
    except OSError:
        return False
    return all(any(m) for m in masks) and len(set(masks)) == 10


@lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """Font files used for digits: matplotlib's bundled fonts plus any usable system fonts.

    Deduplicated by file name (matplotlib's copy wins) and sorted, so a seed gives the same
    images on machines with the same fonts installed.
    """
    by_name: dict[str, Path] = {}
    for path in _system_font_paths() + _matplotlib_font_paths():  # later entries win
        by_name[path.name] = path
    fonts = tuple(str(by_name[n]) for n in sorted(by_name) if _draws_distinct_digits(by_name[n]))
    if not fonts:
        raise RuntimeError("No TrueType font with digits found (matplotlib's fonts missing?).")
    return fonts


@lru_cache(maxsize=512)
def _load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@lru_cache(maxsize=64)
def _digit_height_per_point(path: str) -> float:
    """Ink height of the digits per unit of font size, to size fonts by digit height."""
    left, top, right, bottom = _load_font(path, 100).getbbox("0123456789", anchor="ls")
    return (bottom - top) / 100


def _font_for_digit_height(path: str, digit_height: float) -> ImageFont.FreeTypeFont:
    return _load_font(path, max(6, round(digit_height / _digit_height_per_point(path))))


# --------------------------------------------------------------------------- labels


def sample_digits(rng: np.random.Generator, max_digits: int = 5) -> list[int]:
    """A house number: length weighted like the real data, leading digit rarely 0."""
    weights = np.asarray(_LENGTH_WEIGHTS[:max_digits])
    length = 1 + int(rng.choice(max_digits, p=weights / weights.sum()))
    # Leading digits of house numbers roughly follow Benford's law; mix with uniform.
    benford = np.log10(1 + 1 / np.arange(1, 10))
    lead_p = np.concatenate([[0.02], 0.98 * (0.5 * benford + 0.5 / 9)])
    lead = int(rng.choice(10, p=lead_p / lead_p.sum()))
    return [lead] + [int(d) for d in rng.integers(0, 10, size=length - 1)]


# --------------------------------------------------------------------------- colours


def _luma(colour: Sequence[float]) -> float:
    r, g, b = colour
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255


def _random_colour(rng: np.random.Generator) -> Colour:
    if rng.random() < 0.7:
        base = np.asarray(_PALETTE[rng.integers(len(_PALETTE))], dtype=float)
        rgb = base + rng.normal(0, 14, 3)
    else:  # any colour, but mostly muted like weathered paint
        rgb = rng.uniform(0, 255, 3)
        rgb = rgb + rng.uniform(0.0, 0.8) * (rgb.mean() - rgb)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))  # type: ignore[return-value]


def _contrasting_colour(
    rng: np.random.Generator, ref: Colour, min_diff: float, max_diff: float = 1.0
) -> Colour:
    """A colour whose luma differs from ``ref`` by min_diff..max_diff (readable text)."""
    for _ in range(40):
        colour = _random_colour(rng)
        if min_diff <= abs(_luma(colour) - _luma(ref)) <= max_diff:
            return colour
    return (15, 15, 15) if _luma(ref) > 0.5 else (240, 240, 240)


def _shade(colour: Colour, factor: float) -> Colour:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)  # type: ignore[return-value]


# --------------------------------------------------------------------------- glyph layer


def _layout_digit_masks(
    digits: Sequence[int],
    font: ImageFont.FreeTypeFont,
    digit_height: float,
    rng: np.random.Generator,
    pad: int,
) -> list[Image.Image]:
    """One mask per digit, all on a shared canvas, placed left to right on a jittered baseline."""
    chars = [str(d) for d in digits]
    bboxes = [font.getbbox(c, anchor="ls") for c in chars]
    wide = rng.random() < 0.05  # now and then widely spaced numbers
    base_gap = digit_height * (rng.uniform(0.35, 0.6) if wide else rng.uniform(0.0, 0.25))
    gaps = np.maximum(base_gap + rng.normal(0, 0.03 * digit_height, len(chars)), 0.5)
    jitter = rng.normal(0, 0.025 * digit_height, len(chars))
    widths = [b[2] - b[0] for b in bboxes]
    xs = pad + np.concatenate([[0.0], np.cumsum(np.asarray(widths[:-1]) + gaps[:-1])])
    top = min(b[1] for b in bboxes) - np.abs(jitter).max()
    bottom = max(b[3] for b in bboxes) + np.abs(jitter).max()
    size = (int(math.ceil(xs[-1] + widths[-1] + pad)), int(math.ceil(bottom - top + 2 * pad)))
    baseline = pad - top
    masks = []
    for char, bbox, x, dy in zip(chars, bboxes, xs, jitter):
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).text((x - bbox[0], baseline + dy), char, 255, font, anchor="ls")
        masks.append(mask)
    return masks


def _sample_warp(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Forward 3x3 homography: small rotation, shear, aspect change and perspective."""
    w, h = size
    angle = math.radians(float(np.clip(rng.normal(0, 4), -12, 12)))
    shear = float(np.clip(rng.normal(0, 0.12), -0.35, 0.35)) if rng.random() < 0.6 else 0.0
    stretch = float(np.exp(rng.normal(0, 0.12)))  # condensed or wide lettering
    persp_x, persp_y = rng.normal(0, 0.06, 2) / np.array([w, h])
    to_centre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    scale = np.diag([stretch, 1.0, 1.0])
    shear_m = np.array([[1, -shear, 0], [0, 1, 0], [0, 0, 1]])
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    perspective = np.array([[1, 0, 0], [0, 1, 0], [persp_x, persp_y, 1]])
    return perspective @ rotate @ shear_m @ scale @ to_centre


def _warp_masks(masks: list[Image.Image], forward: np.ndarray) -> list[Image.Image]:
    """Apply a homography to every mask, on an output canvas that holds the whole input."""
    w, h = masks[0].size
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=float).T
    mapped = forward @ corners
    xs, ys = mapped[0] / mapped[2], mapped[1] / mapped[2]
    shift = np.array([[1, 0, -xs.min()], [0, 1, -ys.min()], [0, 0, 1]])
    inverse = np.linalg.inv(shift @ forward)
    coeffs = tuple((inverse / inverse[2, 2]).ravel()[:8])
    out_size = (int(math.ceil(xs.max() - xs.min())), int(math.ceil(ys.max() - ys.min())))
    return [
        m.transform(out_size, Image.Transform.PERSPECTIVE, coeffs, Image.BILINEAR) for m in masks
    ]


def _ink_box(mask: Image.Image, grow: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mask's ink, grown by ``grow`` pixels (for outlines)."""
    bbox = mask.point(lambda v: 255 if v > _INK_THRESHOLD else 0).getbbox() or mask.getbbox()
    if bbox is None:
        raise RuntimeError("a digit glyph rendered no ink")
    x0, y0, x1, y1 = bbox
    return x0 - grow, y0 - grow, x1 + grow, y1 + grow


def _union_mask(masks: list[Image.Image]) -> Image.Image:
    union = masks[0]
    for mask in masks[1:]:
        union = ImageChops.lighter(union, mask)
    return union


# --------------------------------------------------------------------------- background


def _smooth_field(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a small random grid upsampled bicubically."""
    w, h = size
    grid_w = max(2, round(cells * w / max(w, h)))
    grid_h = max(2, round(cells * h / max(w, h)))
    small = Image.fromarray(rng.normal(0, 1, (grid_h, grid_w)).astype(np.float32), "F")
    return np.asarray(small.resize((w, h), Image.BICUBIC)) / 1.5


def _linear_gradient(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(angle) / max(w, 1) + ys * math.sin(angle) / max(h, 1)
    return t - t.mean()


def _siding_or_brick(rng: np.random.Generator, size: tuple[int, int], period: float) -> np.ndarray:
    """Multiplicative texture: clapboard siding lines or a brick wall with mortar joints."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    period = max(3, int(period))
    rows = ys // period
    joint = (ys % period) < max(1, period // 8)
    if rng.random() < 0.5:  # siding: dark joint lines, each board slightly different
        board = 1 + rng.normal(0, 0.04, rows.max() + 1)[rows]
        return np.where(joint, 0.7, board)
    brick_w = max(6, int(period * rng.uniform(1.8, 3.0)))
    shifted = xs + (rows % 2) * (brick_w // 2)
    joint |= (shifted % brick_w) < max(1, period // 8)
    brick_id = rows * (w // brick_w + 2) + shifted // brick_w
    per_brick = 1 + rng.normal(0, 0.08, brick_id.max() + 1)[brick_id]
    return np.where(joint, rng.uniform(0.8, 1.4), per_brick)


def _background(
    rng: np.random.Generator, size: tuple[int, int], base: Colour, digit_height: float
) -> np.ndarray:
    """An HxWx3 float wall: base colour, gradient, blotches and sometimes siding/brick/grain."""
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.float32)
    arr[:] = base
    arr *= (1 + rng.uniform(-0.5, 0.5) * _linear_gradient(rng, size))[..., None]
    arr *= (1 + rng.uniform(0.0, 0.15) * _smooth_field(rng, size, int(rng.integers(2, 8))))[
        ..., None
    ]
    texture = rng.random()
    if texture < 0.25:
        arr *= _siding_or_brick(rng, size, digit_height * rng.uniform(0.3, 0.9))[..., None]
    elif texture < 0.4:  # wood grain / streaks: noise stretched along one axis
        streak = Image.fromarray(rng.normal(0, 1, (max(2, h // 3), 3)).astype(np.float32), "F")
        arr *= (1 + 0.08 * np.asarray(streak.resize((w, h), Image.BICUBIC)))[..., None]
    if rng.random() < 0.5:  # stucco / sensor grain
        arr += rng.normal(0, rng.uniform(2, 10), (h, w, 1)).astype(np.float32)
    return arr


def _draw_patches(
    rng: np.random.Generator, canvas: Image.Image, fg: Colour, keep_out: tuple[int, int, int, int]
) -> None:
    """Rectangles of other colours (frames, windows, mailboxes) that avoid the number itself."""
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.choice(4, p=[0.55, 0.25, 0.12, 0.08]))):
        x0, x1 = sorted(rng.uniform(-0.3, 1.3, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.3, 1.3, 2) * h)
        kx0, ky0, kx1, ky1 = keep_out
        overlaps = x0 < kx1 and x1 > kx0 and y0 < ky1 and y1 > ky0
        if overlaps:  # trim the patch to the side of the number it mostly lies on
            if x1 - kx1 > kx0 - x0:
                x0 = max(x0, kx1 + 1)
            else:
                x1 = min(x1, kx0 - 1)
        if x1 > x0:
            draw.rectangle((x0, y0, x1, y1), fill=_contrasting_colour(rng, fg, 0.25))


def _draw_plate(
    rng: np.random.Generator,
    canvas: Image.Image,
    union: tuple[int, int, int, int],
    colour: Colour,
    border: Colour,
    digit_height: float,
) -> None:
    """A sign plate behind the number, possibly running past the image edge."""
    margins = digit_height * rng.uniform(0.08, 0.5, 4)
    box = (
        union[0] - margins[0],
        union[1] - margins[1],
        union[2] + margins[2],
        union[3] + margins[3],
    )
    radius = int(rng.uniform(0, 0.3) * digit_height) if rng.random() < 0.5 else 0
    width = int(rng.integers(1, 4)) if rng.random() < 0.4 else 0
    ImageDraw.Draw(canvas).rounded_rectangle(
        box, radius=radius, fill=colour, outline=border if width else None, width=width
    )


# --------------------------------------------------------------------------- compositing


def _paste_text(
    rng: np.random.Generator,
    canvas: Image.Image,
    union_mask: Image.Image,
    at: tuple[int, int],
    fg: Colour,
    text_bg: Colour,
    outline: int,
    digit_height: float,
) -> None:
    """Draw the warped digits: optional drop shadow, optional outline, flat or gradient fill."""
    if rng.random() < 0.2:
        offset = (rng.uniform(0.03, 0.1, 2) * digit_height * rng.choice([-1, 1], 2)).astype(int)
        shadow = union_mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))
        strength = rng.uniform(0.4, 0.8)
        shadow = shadow.point(lambda v: int(v * strength))
        canvas.paste(_shade(text_bg, 0.35), (at[0] + offset[0], at[1] + offset[1]), shadow)
    if outline:
        ring = union_mask.filter(ImageFilter.MaxFilter(2 * outline + 1))
        canvas.paste(_contrasting_colour(rng, fg, 0.3), at, ring)
    if rng.random() < 0.25:  # metallic / painted gradient across the lettering
        fill = np.empty((union_mask.height, union_mask.width, 3), dtype=np.float32)
        fill[:] = fg
        fill *= (1 + rng.uniform(0.3, 0.8) * _linear_gradient(rng, union_mask.size))[..., None]
        canvas.paste(Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8)), at, union_mask)
    else:
        canvas.paste(fg, at, union_mask)


def _draw_edge_distractors(
    rng: np.random.Generator,
    canvas: Image.Image,
    union: tuple[int, int, int, int],
    fg: Colour,
    digit_height: float,
) -> None:
    """Neighbouring characters cut by the image border, never touching the labelled digits."""
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    fonts = available_fonts()
    side_gap, row_gap = 0.3 * digit_height, 0.1 * digit_height  # keep clear of the label
    for side in ("left", "right", "top", "bottom"):
        if rng.random() > 0.2:
            continue
        char = _DISTRACTOR_CHARS[rng.integers(len(_DISTRACTOR_CHARS))]
        font = _font_for_digit_height(
            fonts[rng.integers(len(fonts))], digit_height * rng.uniform(0.8, 1.2)
        )
        x0, y0, x1, y1 = font.getbbox(char, anchor="ls")
        gw, gh = x1 - x0, y1 - y0
        visible = rng.uniform(0.15, 0.5)  # share of the glyph inside: clearly cut off
        if side == "left" and union[0] - side_gap > visible * gw:
            pos = (visible * gw - gw, rng.uniform(union[1], max(union[1], union[3] - gh)))
        elif side == "right" and w - union[2] - side_gap > visible * gw:
            pos = (w - visible * gw, rng.uniform(union[1], max(union[1], union[3] - gh)))
        elif side == "top" and union[1] - row_gap > visible * gh:
            pos = (rng.uniform(0, max(1, w - gw)), visible * gh - gh)
        elif side == "bottom" and h - union[3] - row_gap > visible * gh:
            pos = (rng.uniform(0, max(1, w - gw)), h - visible * gh)
        else:
            continue
        # pos is the glyph's ink top-left; convert to the baseline anchor PIL draws from.
        draw.text((pos[0] - x0, pos[1] - y0), char, fill=fg, font=font, anchor="ls")


def _apply_lighting(rng: np.random.Generator, arr: np.ndarray) -> np.ndarray:
    """Uneven light: a soft global brightness field and sometimes a cast shadow edge."""
    h, w = arr.shape[:2]
    light = 1 + rng.uniform(0, 0.25) * _smooth_field(rng, (w, h), 3)
    if rng.random() < 0.2:
        side = _linear_gradient(rng, (w, h)) * rng.uniform(4, 30)  # steepness of the edge
        light *= 1 - rng.uniform(0.3, 0.6) / (1 + np.exp(-side))
    gains = rng.normal(1, 0.06, 3)  # white balance
    arr = arr * light[..., None] * gains
    desaturate = rng.uniform(0, 0.5)  # faded paint, overcast light
    return arr + desaturate * (arr.mean(axis=2, keepdims=True) - arr)


# --------------------------------------------------------------------------- degradation


def _sample_output_size(
    rng: np.random.Generator, canvas: tuple[int, int], digit_height: float
) -> tuple[int, int]:
    """Final size: heights log-normal around 55 px (real median ~50), canvas aspect kept.

    Digits never end up shorter than _MIN_DIGIT_PIXELS: smaller ones are unreadable noise.
    """
    cw, ch = canvas
    height = float(np.clip(np.exp(rng.normal(math.log(55), 0.5)), 16, 400))
    height = max(height, ch * _MIN_DIGIT_PIXELS / digit_height)
    width = height * cw / ch
    if not 24 <= width <= 900:
        width = float(np.clip(width, 24, 900))
        height = float(np.clip(width * ch / cw, 12, 400))
    return max(1, round(width)), max(1, round(height))


def _degrade(rng: np.random.Generator, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resample to the output size and add camera artefacts: blur, low resolution, noise, JPEG."""
    resample = [Image.BILINEAR, Image.BICUBIC, Image.LANCZOS, Image.BOX][rng.integers(4)]
    if rng.random() < 0.25:  # captured at lower resolution, then upscaled
        factor = rng.uniform(0.35, 0.75)
        small = (max(4, round(size[0] * factor)), max(4, round(size[1] * factor)))
        image = image.resize(small, resample)
    image = image.resize(size, resample)
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.3)))
    elif rng.random() < 0.1:  # slight horizontal motion blur
        image = image.filter(ImageFilter.Kernel((3, 3), [0, 0, 0, 1, 1, 1, 0, 0, 0], scale=3))
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0.5, 7), arr.shape[:2] + (1,))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(25, 92)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def _scale_box(box: tuple[int, int, int, int], sx: float, sy: float, size: tuple[int, int]) -> Box:
    """Render-space (x0, y0, x1, y1) -> output-space (left, top, width, height), clipped."""
    x0 = min(max(0, math.floor(box[0] * sx)), size[0] - 1)
    y0 = min(max(0, math.floor(box[1] * sy)), size[1] - 1)
    x1 = max(x0 + 1, min(size[0], math.ceil(box[2] * sx)))
    y1 = max(y0 + 1, min(size[1], math.ceil(box[3] * sy)))
    return x0, y0, x1 - x0, y1 - y0


# --------------------------------------------------------------------------- public API


def render_number(digits: list[int], rng: np.random.Generator) -> tuple[Image.Image, list[Box]]:
    """Render ``digits`` as a house-number photo.

    Returns the RGB image and one ``(left, top, width, height)`` box per digit, left to right:
    the axis-aligned box of that digit's ink (outline included) in the returned image.
    All randomness comes from ``rng``.
    """
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise SettingError(f"digits must be a non-empty list of 0-9, got {digits!r}")
    fonts = available_fonts()
    # Work at a comfortable render size, then resample to the output size at the end.
    digit_height = rng.uniform(30, 56)
    font = _font_for_digit_height(fonts[rng.integers(len(fonts))], digit_height)
    outline = int(rng.integers(1, 4)) if rng.random() < 0.15 else 0
    masks = _layout_digit_masks(digits, font, digit_height, rng, pad=outline + 4)
    masks = _warp_masks(masks, _sample_warp(rng, masks[0].size))
    ink = [_ink_box(m, outline) for m in masks]
    ux0, uy0 = min(b[0] for b in ink), min(b[1] for b in ink)
    union_w = max(b[2] for b in ink) - ux0
    union_h = max(b[3] for b in ink) - uy0

    # Digits cover only part of the frame, at a random offset.
    share_w = rng.uniform(0.3, 0.85)
    share_h = rng.uniform(0.4, 0.92) if rng.random() < 0.9 else rng.uniform(0.22, 0.4)
    canvas_size = (
        max(union_w + 2, round(union_w / share_w)),
        max(union_h + 2, round(union_h / share_h)),
    )
    # Usually keep a small margin so labelled digits are not cut by the border.
    margin = 2 if rng.random() < 0.9 else 0
    canvas_size = (canvas_size[0] + 2 * margin, canvas_size[1] + 2 * margin)
    x0 = int(rng.integers(margin, canvas_size[0] - union_w - margin + 1))
    y0 = int(rng.integers(margin, canvas_size[1] - union_h - margin + 1))
    union = (x0, y0, x0 + union_w, y0 + union_h)
    at = (x0 - ux0, y0 - uy0)  # where the warped mask canvas goes

    fg = _random_colour(rng)
    contrast = (0.3, 1.0) if rng.random() < 0.9 else (0.15, 0.3)
    text_bg = _contrasting_colour(rng, fg, *contrast)
    has_plate = rng.random() < 0.4
    wall = _random_colour(rng) if has_plate else text_bg
    canvas_arr = _background(rng, canvas_size, wall, digit_height)
    canvas = Image.fromarray(np.clip(canvas_arr, 0, 255).astype(np.uint8))
    _draw_patches(rng, canvas, fg, union)
    if has_plate:
        _draw_plate(rng, canvas, union, text_bg, _shade(text_bg, 0.6), digit_height)
    _draw_edge_distractors(rng, canvas, union, fg, digit_height)
    _paste_text(rng, canvas, _union_mask(masks), at, fg, text_bg, outline, digit_height)
    lit = _apply_lighting(rng, np.asarray(canvas, dtype=np.float32))
    canvas = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))

    out_size = _sample_output_size(rng, canvas_size, digit_height)
    sx, sy = out_size[0] / canvas_size[0], out_size[1] / canvas_size[1]
    boxes = [
        _scale_box((b[0] + at[0], b[1] + at[1], b[2] + at[0], b[3] + at[1]), sx, sy, out_size)
        for b in ink
    ]
    return _degrade(rng, canvas, out_size), boxes


def _annotation(digits: list[int], boxes: list[Box]) -> dict[str, list[int]]:
    return {
        "label": list(digits),
        "left": [b[0] for b in boxes],
        "top": [b[1] for b in boxes],
        "width": [b[2] for b in boxes],
        "height": [b[3] for b in boxes],
    }


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _owned_paths(out_dir: Path) -> list[Path]:
    """Everything this generator writes (and so may delete when regenerating)."""
    files = [f"{s}.json" for s in SPLITS[:2]] + [TEST_LABELS_NAME, SUBMIT_NAME]
    files += [f"{name}.tmp" for name in files]
    return [out_dir / f for f in files] + [out_dir / s for s in SPLITS]


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Clear a previous synthetic dataset; refuse to touch other non-empty folders."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"Cannot write the synthetic dataset to {out_dir}: it is a file.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MARKER_NAME).is_file() and not overwrite:
            raise OutputExistsError(
                f"Refusing to write synthetic data into {out_dir}: the folder is not empty and "
                "is not a previous synthetic dataset. Pick another --out or pass --overwrite."
            )
        for path in _owned_paths(out_dir):  # label files go first: no labels without images
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _marker_text(params: dict[str, int]) -> str:
    return (
        "Synthetic SVHN-style dataset written by `python -m svhn.synthetic`.\n"
        "Not real data. mchar_test_a_labels.json exists only in synthetic datasets.\n"
        f"parameters: {json.dumps(params, sort_keys=True)}\n"
    )


def generate_dataset(
    out_dir: str | Path,
    n_train: int = 1000,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    max_digits: int = 5,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset in the competition layout to ``out_dir`` and return it.

    ``n_val`` and ``n_test`` default to ``max(1, n_train // 4)``. Labels have 1..max_digits
    digits. The label JSON files are written last (temp file + rename), so a folder with
    ``mchar_train.json`` is complete. A non-empty ``out_dir`` that is not a previous synthetic
    dataset raises FileExistsError unless ``overwrite`` (which replaces only this generator's
    files). ``progress`` shows a tqdm bar.
    """
    n_val = max(1, n_train // 4) if n_val is None else n_val
    n_test = max(1, n_train // 4) if n_test is None else n_test
    counts = (n_train, n_val, n_test)
    if min(counts) < 0:
        raise SettingError(f"image counts must be >= 0, got train/val/test = {counts}")
    if not 1 <= max_digits <= MAX_SUPPORTED_DIGITS:
        raise SettingError(f"max_digits must be in 1..{MAX_SUPPORTED_DIGITS}, got {max_digits}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    params = {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "max_digits": max_digits,
    }
    (out_dir / MARKER_NAME).write_text(_marker_text(params), encoding="utf-8")

    annotations: list[dict[str, dict[str, list[int]]]] = []
    with tqdm(total=sum(counts), unit="img", desc="synthetic", disable=not progress) as bar:
        for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
            annotations.append(
                _write_split(out_dir / split, split_index, count, seed, max_digits, bar)
            )

    test_names = sorted(annotations[2])
    _write_atomically(
        out_dir / SUBMIT_NAME, "file_name,file_code\n" + "".join(f"{n},0\n" for n in test_names)
    )
    label_files = (TEST_LABELS_NAME, f"{SPLITS[1]}.json", f"{SPLITS[0]}.json")  # train last
    for name, split_annotations in zip(label_files, annotations[::-1]):
        _write_atomically(out_dir / name, json.dumps(split_annotations))
    return out_dir


def _write_split(
    split_dir: Path, split_index: int, count: int, seed: int, max_digits: int, bar: tqdm
) -> dict[str, dict[str, list[int]]]:
    split_dir.mkdir(parents=True, exist_ok=True)
    annotations = {}
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])  # independent of generation order
        digits = sample_digits(rng, max_digits)
        image, boxes = render_number(digits, rng)
        name = f"{i:06d}.png"
        image.save(split_dir / name, format="PNG", compress_level=3)
        annotations[name] = _annotation(digits, boxes)
        bar.update(1)
    return annotations


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.synthetic",
        description="Write a synthetic house-number dataset in the competition's layout.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--n_val", type=int, default=None, help="default max(1, n // 4)")
    parser.add_argument("--n_test", type=int, default=None, help="default max(1, n // 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_digits", type=int, default=5, help="longest label (default 5)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this generator's files even in a non-synthetic folder",
    )
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    start = time.perf_counter()
    out = generate_dataset(
        args.out,
        n_train=args.n,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        max_digits=args.max_digits,
        overwrite=args.overwrite,
        progress=True,
    )
    elapsed = time.perf_counter() - start
    n_val = max(1, args.n // 4) if args.n_val is None else args.n_val
    n_test = max(1, args.n // 4) if args.n_test is None else args.n_test
    total = args.n + n_val + n_test
    print(
        f"wrote {args.n} train / {n_val} val / {n_test} test synthetic images to {out} "
        f"in {elapsed:.1f}s ({total / max(elapsed, 1e-9):.0f} img/s, seed {args.seed})"
    )
    return 0
