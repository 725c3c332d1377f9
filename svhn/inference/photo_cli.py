"""Read the number on any photo: ``python -m svhn.read CKPT [CKPT ...] IMAGE|FOLDER ...``.

For each image: the number read, how sure the reader is and where each digit is (pixels of
the upright photo); ``--json`` for machines, ``--draw DIR`` for people (each photo with its
digits' boxes and the reading on it). The reading is ``predict_photos``: the path
``svhn.predict`` takes (each checkpoint with its own settings, the zoom search, the vote of
an ensemble), on photos decoded as a split's images are. A file that cannot be read is
named in one line and the others are still read; the exit code says some were not (1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from svhn.checkpoint_format import CheckpointError
from svhn.data.images import read_rgb
from svhn.data.labels import BLANK, decode_probabilities
from svhn.data.photos import photo_paths
from svhn.errors import SettingError, command, stop_on_sigterm
from svhn.inference.options import add_reader_options, reader_overrides
from svhn.inference.predictions import Predictions
from svhn.inference.predictor import PREDICT_BATCH_SIZE, predict_photos
from svhn.inference.views import PLAIN_VIEWS, TTA_VIEWS
from svhn.model.vote import answer_confidence
from svhn.tempfiles import refuse_existing, write_all_or_none

__all__ = ["DigitFound", "main", "Reading", "readings"]

# A drawing's longer side: large enough to check at a glance, small enough to write quickly.
_DRAWN_MIN, _DRAWN_MAX = 480, 1024


@dataclass
class DigitFound:
    digit: str
    box: list[float] | None  # (x0, y0, x1, y1) pixels of the upright photo


@dataclass
class Reading:
    """One photo's answer: the number as the submission would write it, its confidence
    (the vote's, as for pseudo-labels), the number's box and each digit's, in pixels."""

    file: str
    number: str
    confidence: float
    box: list[float] | None
    digits: list[DigitFound]
    searched: bool | None
    size: tuple[float, float]  # the upright photo's (width, height)


def readings(result: Predictions, sizes: dict[str, tuple[float, float]]) -> list[Reading]:
    """``Predictions`` of photos as readings, boxes scaled to each photo's full size."""
    numbers = decode_probabilities(result.probs)
    confidence = answer_confidence(result.probs, result.chain_probs, result.chain_boxes)
    classes = result.probs.argmax(-1)
    out = []
    for i, name in enumerate(result.file_names):
        width, height = sizes[name]
        box = _pixels(result.boxes[i], width, height) if result.boxes is not None else None
        at = (classes[i] != BLANK).nonzero().squeeze(1).tolist()
        if at and result.char_boxes is not None:
            digits = [DigitFound(str(int(classes[i, p])),
                                 _pixels(result.char_boxes[i, p], width, height)) for p in at]
        else:  # no box per digit, or an all-blank reading written as its best digit
            digits = [DigitFound(d, None) for d in numbers[i]]
        searched = None if result.searched is None else bool(result.searched[i])
        out.append(Reading(name, numbers[i], round(float(confidence[i]), 4), box, digits,
                           searched, (width, height)))
    return out


def _pixels(box: torch.Tensor, width: float, height: float) -> list[float]:
    """A normalised box in a photo's pixels, corners in order (a predicted box may flip)."""
    corners = box.float().clamp(0, 1).view(2, 2)
    ordered = torch.cat([corners.amin(0), corners.amax(0)]) * torch.tensor([width, height] * 2)
    return [round(float(v), 1) for v in ordered]


def _as_text(reading: Reading) -> str:
    places = " ".join(f"{d.digit}@{','.join(f'{v:.0f}' for v in d.box)}"
                      for d in reading.digits if d.box is not None)
    return f"{reading.file}\t{reading.number}\t{reading.confidence:.3f}" + \
        (f"\t{places}" if places else "")


def _as_json(found: list[Reading], failed: dict[str, str], checkpoints: list[Path]) -> str:
    return json.dumps({
        "checkpoints": [str(c) for c in checkpoints],
        "readings": [{"file": r.file, "number": r.number, "confidence": r.confidence,
                      "box": r.box, "searched": r.searched, "size": list(r.size),
                      "digits": [{"digit": d.digit, "box": d.box} for d in r.digits]}
                     for r in found],
        "failed": [{"file": name, "error": why} for name, why in failed.items()],
    }, indent=1)


# -- drawings ----------------------------------------------------------------------------------
def drawing_paths(files: Sequence[Path], folder: Path) -> dict[Path, Path]:
    """Each photo's drawing, ``DIR/<stem>_read.png``; two photos that would share one are
    refused before any work."""
    paths: dict[Path, Path] = {}
    owner: dict[Path, Path] = {}
    for file in files:
        target = folder / f"{file.stem}_read.png"
        if target in owner:
            raise SettingError(f"{owner[target]} and {file} would both be drawn as {target}; "
                               "read them in two runs with different --draw folders.")
        owner[target] = paths[file] = target
    return paths


def _drawing(reading: Reading) -> Image.Image:
    """The photo, its longer side between _DRAWN_MIN and _DRAWN_MAX pixels (a thumbnail-size
    house number is enlarged to be seen), the number's box in yellow, each digit's in green
    with the digit above it, and the reading with its confidence in the corner."""
    image = Image.fromarray(read_rgb(reading.file, at_least=(_DRAWN_MAX, _DRAWN_MAX)))
    longer = max(image.size)
    scale = min(max(1.0, _DRAWN_MIN / longer), _DRAWN_MAX / longer)
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BILINEAR)
    shown = image.width / reading.size[0]
    draw = ImageDraw.Draw(image)
    line = max(1, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 25)))
    if reading.box is not None:
        draw.rectangle([v * shown for v in reading.box], outline=(255, 200, 0), width=line)
    for digit in reading.digits:
        if digit.box is not None:
            box = [v * shown for v in digit.box]
            draw.rectangle(box, outline=(0, 230, 0), width=line)
            draw.text((box[0], box[1]), digit.digit, fill=(0, 230, 0), font=font,
                      anchor="ld", stroke_width=1, stroke_fill=(0, 0, 0))
    draw.text((4, 4), f"{reading.number} ({reading.confidence:.2f})", fill=(255, 40, 40),
              font=font, stroke_width=2, stroke_fill=(255, 255, 255))
    return image


def _drawing_writer(reading: Reading):
    def write(tmp: Path) -> None:  # drawn as it is written: one photo in memory at a time
        _drawing(reading).save(tmp, format="PNG")
    return write


# -- the command -------------------------------------------------------------------------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.read", allow_abbrev=False,
        description="Read the number on any photos (PNG, JPEG, WebP, ...; a folder: the "
                    "images directly in it) with one or more checkpoints: the number, its "
                    "confidence and each digit's box in pixels. Several checkpoints vote "
                    "as in svhn.predict.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="CKPT_OR_IMAGE",
                        help="checkpoint(s) (.ckpt), then image files or folders")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (readings and unreadable files) "
                             "instead of lines; progress goes to stderr")
    parser.add_argument("--draw", type=Path, default=None, metavar="DIR",
                        help="write each photo with its digits' boxes and the reading to "
                             "DIR/<name>_read.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace drawings that exist")
    parser.add_argument("--batch_size", type=int, default=PREDICT_BATCH_SIZE)
    parser.add_argument("--accelerator", default="auto")
    reader = add_reader_options(parser)
    args = parser.parse_args(argv)
    args.reader_overrides = reader_overrides(args, reader)
    args.checkpoints = [p for p in args.inputs if p.suffix == ".ckpt"]
    args.images = [p for p in args.inputs if p.suffix != ".ckpt"]
    if not args.checkpoints:
        raise CheckpointError("no checkpoint given: name a .ckpt file first, then the "
                              "images.")
    if not args.images:
        raise SettingError("no image given: name image files or folders after the "
                           "checkpoint(s).")
    return args


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    files = photo_paths(args.images)
    drawings = drawing_paths(files, args.draw) if args.draw else {}
    refuse_existing(list(drawings.values()), args.overwrite,
                    elsewhere="choose another --draw folder")
    # Progress and notices to stderr: stdout is the readings alone (lines or JSON).
    with stop_on_sigterm("reading stopped; nothing was written."), \
            contextlib.redirect_stdout(sys.stderr):
        result, photos = predict_photos(
            args.checkpoints, files, views=TTA_VIEWS if args.tta else PLAIN_VIEWS,
            batch_size=args.batch_size, accelerator=args.accelerator,
            precision=args.precision, **args.reader_overrides)
    sizes = {name: tuple(size.tolist()) for name, size in zip(photos.names, photos.sizes)}
    order = {str(file): i for i, file in enumerate(files)}  # as given, not sorted
    found = sorted(readings(result, sizes), key=lambda r: order[r.file])
    for name, why in photos.failed.items():
        print(f"skipped {name}: {why}", file=sys.stderr, flush=True)
    if args.json:
        print(_as_json(found, photos.failed, result.checkpoints), flush=True)
    else:
        for reading in found:
            print(_as_text(reading), flush=True)
    if drawings:
        args.draw.mkdir(parents=True, exist_ok=True)
        write_all_or_none({drawings[Path(r.file)]: _drawing_writer(r) for r in found},
                          overwrite=args.overwrite)
        print(f"Drew {len(found)} image(s) in {args.draw}.", file=sys.stderr, flush=True)
    return 1 if photos.failed else 0
