"""Competition label files: JSON -> typed samples, digit strings <-> fixed-length targets.

A target is the digit list padded to ``max_len`` with the blank class 10, so every image has
``max_len`` positions of 11 classes each. Decoding drops blanks wherever they stand, so a
prediction ``[1, 10, 2, 10, 10]`` reads ``"12"``: the competition scores strings, not slots.
"""

from __future__ import annotations

import codecs
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from svhn.console import DataWarning
from svhn.errors import SettingError, SvhnError

__all__ = ["BLANK", "BOX_KEYS", "canonical_predictions", "clip_boxes_to_images",
           "decode_label", "decode_probabilities", "DEFAULT_MAX_LEN", "encode_label",
           "LabelFileError", "load_labels", "NUM_CLASSES", "Sample", "split_by_length"]

BLANK = 10
NUM_CLASSES = 11
DEFAULT_MAX_LEN = 5
BOX_KEYS = ("left", "top", "width", "height")


class LabelFileError(SvhnError, ValueError):
    """A label file that cannot be read as the competition's format."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: its file name, digits left to right and per-digit boxes (pixels)."""

    file_name: str
    digits: tuple[int, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # (left, top, width, height)

    @property
    def label(self) -> str:
        return "".join(str(d) for d in self.digits)

    def union_box(self) -> tuple[float, float, float, float]:
        """The box around all digits as (x0, y0, x1, y1) in pixels."""
        x0 = min(b[0] for b in self.boxes)
        y0 = min(b[1] for b in self.boxes)
        x1 = max(b[0] + b[2] for b in self.boxes)
        y1 = max(b[1] + b[3] for b in self.boxes)
        return x0, y0, x1, y1


def load_labels(path: str | Path) -> list[Sample]:
    """Read a competition label JSON into samples sorted by file name.

    Raises LabelFileError naming the file (and entry) for anything that is not the format.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: label file not found. Put the competition's JSON there.")
    try:
        raw = json.loads(_label_text(path), object_pairs_hook=_refuse_repeated_keys(path))
    except json.JSONDecodeError as err:
        raise LabelFileError(
            f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}). "
            "Re-download the label file; it may be truncated."
        ) from None
    if not isinstance(raw, dict):
        raise LabelFileError(f"{path}: expected an object mapping file name -> label entry.")
    if not raw:
        raise LabelFileError(
            f"{path}: no entries (the file holds an empty object); expected one entry per "
            'image, e.g. {"000000.png": {"label": [1, 9], "left": [...], ...}}. Re-download '
            "the label file."
        )
    return [_parse_entry(path, name, raw[name]) for name in sorted(raw)]


def _refuse_repeated_keys(path: Path):
    """JSON lets a key repeat (the last wins); in a label file one image with two entries is
    a merge gone wrong, never meant: refused with both entries shown."""
    def pairs_to_dict(pairs: list[tuple[str, object]]) -> dict:
        found: dict[str, object] = {}
        for key, value in pairs:
            if key in found:
                raise LabelFileError(
                    f"{path}: {key!r} appears twice ({json.dumps(found[key])[:120]} and "
                    f"{json.dumps(value)[:120]}); keep one entry per image (or one value "
                    "per field) and remove the other.")
            found[key] = value
        return found
    return pairs_to_dict


def _label_text(path: Path) -> str:
    """The file's text: UTF-8 (with or without a BOM), or UTF-16 when it starts with a
    UTF-16 BOM (what Windows PowerShell's ``>`` writes)."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise LabelFileError(
            f"{path}: not {encoding.split('-sig')[0].upper()} text (byte {err.start}: "
            f"{err.reason}). Save the label file as UTF-8 JSON, or re-download it.") from None


def _parse_entry(path: Path, name: str, entry: object) -> Sample:
    where = f"{path}: entry {name!r}"
    if not isinstance(entry, dict) or "label" not in entry:
        raise LabelFileError(f"{where}: expected an object with a 'label' list.")
    digits = entry["label"]
    if not isinstance(digits, list) or not digits:
        raise LabelFileError(f"{where}: empty or missing label; every image has 1+ digits.")
    for d in digits:
        if isinstance(d, bool) or not isinstance(d, int):
            kind = "a string" if isinstance(d, str) else f"a {type(d).__name__}"
            raise LabelFileError(f"{where}: digit {d!r} is {kind}; the competition writes "
                                 "digits as whole numbers 0-9 (e.g. [1, 9]).")
        if d == 10:
            raise LabelFileError(
                f"{where}: digit 10 is outside 0-9. The original SVHN files write 0 as 10: "
                "map 10 to 0 in the label file before use (this project reads the "
                "competition's labels, where 0 is 0).")
        if not 0 <= d <= 9:
            raise LabelFileError(f"{where}: digit {d!r} is outside 0-9; fix the entry.")
    lists = {key: entry.get(key) for key in BOX_KEYS}
    for key, values in lists.items():
        if not isinstance(values, list) or len(values) != len(digits):
            got = len(values) if isinstance(values, list) else values
            raise LabelFileError(
                f"{where}: '{key}' has {got} values for {len(digits)} digits; "
                "each digit needs one box."
            )
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise LabelFileError(
                    f"{where}: '{key}' of digit {i + 1} is {value!r}, not a number of "
                    "pixels. Fix the entry (or remove it)."
                )
    boxes = tuple(
        tuple(float(lists[k][i]) for k in BOX_KEYS) for i in range(len(digits))
    )
    for i, (_, _, width, height) in enumerate(boxes):
        if width <= 0 or height <= 0:
            raise LabelFileError(
                f"{where}: the box of digit {i + 1} has width {width:g} and height "
                f"{height:g}: not a box (both must be > 0). Fix the entry (or remove it)."
            )
    return Sample(name, tuple(digits), boxes)  # type: ignore[arg-type]


def clip_boxes_to_images(
    samples: Sequence[Sample], image_sizes: dict[str, tuple[int, int]], source: str
) -> list[Sample]:
    """Boxes partly outside their image are clipped to it (one warning for them all);
    a box wholly outside its image is refused. ``image_sizes``: file name -> (width, height).
    """
    out, clipped = [], []
    for sample in samples:
        width, height = image_sizes[sample.file_name]
        boxes = []
        for i, (left, top, w, h) in enumerate(sample.boxes):
            x0, y0 = max(left, 0.0), max(top, 0.0)
            x1, y1 = min(left + w, float(width)), min(top + h, float(height))
            if x1 <= x0 or y1 <= y0:
                raise LabelFileError(
                    f"{source}: entry {sample.file_name!r}: the box of digit {i + 1} (left "
                    f"{left:g}, top {top:g}, width {w:g}, height {h:g}) lies wholly outside "
                    f"its {width}x{height} image. Fix the entry (or remove it)."
                )
            boxes.append((x0, y0, x1 - x0, y1 - y0))
        if tuple(boxes) != sample.boxes:
            clipped.append(sample.file_name)
            sample = Sample(sample.file_name, sample.digits, tuple(boxes))
        out.append(sample)
    if clipped:
        warnings.warn(
            f"{source}: {len(clipped)} image(s) have digit boxes partly outside the image "
            f"(first: {', '.join(clipped[:5])}); they are clipped to the image.",
            DataWarning, stacklevel=2,
        )
    return out


def encode_label(digits: Sequence[int], max_len: int = DEFAULT_MAX_LEN) -> list[int]:
    """Digits -> a target of length ``max_len`` padded with BLANK. Never truncates."""
    if len(digits) > max_len:
        raise SettingError(
            f"label {''.join(map(str, digits))!r} has {len(digits)} digits > max_len={max_len}; "
            "raise max_len to keep it."
        )
    return list(digits) + [BLANK] * (max_len - len(digits))


def decode_label(classes: Sequence[int]) -> str:
    """Per-position classes -> digit string; blanks are dropped wherever they stand."""
    return "".join(str(int(c)) for c in classes if int(c) != BLANK)


def split_by_length(
    samples: Sequence[Sample], max_len: int, source: str = "labels"
) -> tuple[list[Sample], list[Sample]]:
    """Keep samples that fit ``max_len``; warn once about the others (never truncate them)."""
    kept = [s for s in samples if len(s.digits) <= max_len]
    too_long = [s for s in samples if len(s.digits) > max_len]
    if too_long:
        names = ", ".join(s.file_name for s in too_long[:10])
        warnings.warn(
            f"{source}: left out {len(too_long)} image(s) whose label is longer than "
            f"max_len={max_len} ({names}); set max_len={max(len(s.digits) for s in too_long)} "
            "to keep them.",
            DataWarning, stacklevel=2,
        )
    return kept, too_long


def canonical_predictions(probs: torch.Tensor) -> torch.Tensor:
    """Per-position probabilities (B, L, 11) -> left-aligned class targets (B, L).

    This is exactly what the submission writes: blanks removed, digits shifted left, and for
    an all-blank prediction the single most likely digit (an empty code can be rejected).
    Comparing its output with targets gives the competition's whole-string accuracy.
    """
    classes = probs.argmax(dim=-1)
    is_digit = classes != BLANK
    # Stable sort on "is blank" moves the digits left, keeping their order.
    order = torch.sort((~is_digit).to(torch.int8), dim=1, stable=True).indices
    aligned = torch.gather(classes, 1, order)
    empty = ~is_digit.any(dim=1)
    # For every row, then kept where the row is empty: no host sync (if empty.any()) on a GPU.
    best_digit = probs[..., :BLANK].amax(dim=1).argmax(dim=-1)
    aligned[:, 0] = torch.where(empty, best_digit, aligned[:, 0])
    return aligned


def decode_probabilities(probs: torch.Tensor) -> list[str]:
    """(B, L, 11) probabilities -> the submission strings (never empty)."""
    return [decode_label(row.tolist()) for row in canonical_predictions(probs)]
