"""An easy set a small model learns in seconds, so round trips compare real scores.

Dark digits (1 or 2) centred with a few pixels of jitter on a light, mildly noisy
background, in the competition layout with true per-digit boxes. simple_cnn reaches a
val/seq_acc of about 0.2-0.3 in 8 epochs: above zero, below one, with many borderline
images, so a change in what the model is fed moves the numbers.
"""

from __future__ import annotations

from pathlib import Path

from helpers.layout import write_sample_submission, write_split

EASY_IMAGE = (128, 64)  # (width, height) of every image on disk
EASY_COUNTS = {"train": 300, "val": 81, "test_a": 20}  # 81: odd, for DDP


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


def make_easy_dataset(root: Path, seed: int = 0, counts: dict[str, int] | None = None,
                      most_digits: int = 2, looks: dict[str, dict] | None = None) -> Path:
    """The competition layout (plus test-A labels and a sample submission) of easy images,
    ``counts`` images per split (default ``EASY_COUNTS``), 1 to ``most_digits`` digits;
    ``looks`` gives a split other ``draw_easy_number`` arguments (digit_height, jitter)."""
    import numpy as np

    for split_index, (split, count) in enumerate((counts or EASY_COUNTS).items()):
        entries, pictures = {}, {}
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            digits = [int(d) for d in rng.integers(0, 10, int(rng.integers(1, most_digits + 1)))]
            name = f"{i:06d}.png"
            pictures[name], boxes = draw_easy_number(digits, rng,
                                                     **(looks or {}).get(split, {}))
            entries[name] = {"label": digits, "left": [b[0] for b in boxes],
                             "top": [b[1] for b in boxes], "width": [b[2] for b in boxes],
                             "height": [b[3] for b in boxes]}
        write_split(root, split, entries, image=pictures.__getitem__)
    return write_sample_submission(root, entries)  # the last split: test_a
