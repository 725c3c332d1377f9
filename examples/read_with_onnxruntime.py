"""Read house numbers with an exported reader and onnxruntime alone: no PyTorch, no svhn.

    python -m svhn.export CKPT --out reader.onnx      # writes reader.onnx and reader.json
    python examples/read_with_onnxruntime.py reader.onnx photo.jpg folder/ ...

Prints one line per photo: ``file<TAB>number<TAB>confidence``. Needs numpy, Pillow and
onnxruntime (``pip install "svhn[export]"`` brings them); OpenCV only when the sidecar's
two sizes differ (the second resize is OpenCV's, as in the project; without it Pillow's
bilinear stands in, which can move a pixel value by one or two). The preprocessing and the
decoding follow the sidecar (``reader.json`` beside ``reader.onnx``); copy what you need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(inputs: list[str]) -> list[Path]:
    """The files named, and the images directly in the folders named (by name)."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.iterdir()
                            if p.is_file() and p.suffix.lower() in SUFFIXES)
        else:
            found.append(item)
    return found


def as_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3); 16-bit grey keeps its top 8 bits, float grey is scaled to 8 bits
    (Pillow's own conversion would clip both to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else 1.0
        grey = np.nan_to_num(grey * scale).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def resize_second(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The cached image to the input size (height, width): OpenCV's bilinear, as the
    project's evaluation transform."""
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    try:
        import cv2
    except ImportError:
        print("note: OpenCV is not installed; Pillow's bilinear resize stands in for it "
              "(a pixel value may differ by one or two).", file=sys.stderr)
        return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)


def load_image(path: Path, cache_size: tuple[int, int], input_size: tuple[int, int]
               ) -> np.ndarray:
    """One photo as the model takes it: uint8 (3, H, W), the sidecar's two resizes."""
    height, width = cache_size
    with Image.open(path) as image:
        if image.format == "JPEG":  # decode at the smallest DCT scale still large enough
            image.draft("RGB", (max(cache_size), max(cache_size)))
        rgb = as_rgb(ImageOps.exif_transpose(image))
    cached = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    return resize_second(cached, input_size).transpose(2, 0, 1)


def decode(probs: np.ndarray, blank: int) -> tuple[str, float]:
    """One (max_len, classes) table -> the number and its confidence: blanks dropped
    wherever they stand; all blank -> the digit most likely at any position."""
    classes = probs.argmax(-1)
    digits = [str(c) for c in classes if c != blank]
    if not digits:
        digits = [str(probs[:, :blank].max(0).argmax())]
    return "".join(digits), float(probs.max(-1).prod())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the exported reader (.onnx)")
    parser.add_argument("images", nargs="+", help="image files or folders of them")
    parser.add_argument("--sidecar", type=Path, default=None,
                        help="its JSON (default: the model's name with .json)")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    sidecar = json.loads((args.sidecar or args.model.with_suffix(".json")).read_text())
    steps = sidecar["preprocessing"]
    cache_size, input_size = tuple(steps["cache_size"]), tuple(steps["input_size"])
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    files = image_files(args.images)
    for first in range(0, len(files), args.batch_size):
        batch = files[first:first + args.batch_size]
        images = np.stack([load_image(path, cache_size, input_size) for path in batch])
        (probs,) = session.run(["probs"], {sidecar["input"]["name"]: images})
        for path, table in zip(batch, probs):
            number, confidence = decode(table, sidecar["blank"])
            print(f"{path}\t{number}\t{confidence:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
