"""The reader as ONNX: ``python -m svhn.export CKPT --out reader.onnx [--check IMAGE|FOLDER ...]``.

What is exported is a checkpoint's reader as ``svhn.fit`` validates it, ``forward(images,
search=False)``: uint8 (N, 3, H, W) RGB images at the checkpoint's evaluation size (its
``image_size`` times the data's ``eval_scale``), any N, in; ``probs`` (N, max_len, 11),
and ``box`` (N, 4) and ``char_boxes`` (N, max_len, 4) where the reader predicts them, out.
A zooming reader's whole chain (the whole-image read, then ``zoom_steps`` crop reads) and a
detector's decoding into positions are in the graph. ``--search`` exports the full zoom
search instead (every image's 29 chains and the vote: ``svhn.predict --full_search``).

Beside the model a sidecar JSON (``reader.json`` for ``reader.onnx``) says what a reader
without PyTorch needs: the two resizes, the input and output names and shapes, the
decoding rule, what is in the graph and what is not, where it came from, and the check.
``examples/read_with_onnxruntime.py`` reads photos with the two files alone.

The export is checked before anything is written: the PyTorch reader and the ONNX model
under onnxruntime read the same uint8 images (``--check`` photos, or generated house
numbers), decoded as ``svhn.predict`` decodes; the command says how many strings agree, the
largest difference of the probabilities, and each image that reads differently with the
margin between its top two classes (a near tie flips on float rounding). ``--strict``: any
difference exits 1 and writes nothing. Both files are written all or none.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from svhn.checkpoint_format import CheckpointContents, read_checkpoint
from svhn.data.labels import BLANK, NUM_CLASSES, decode_probabilities
from svhn.data.photos import Photos, decode_photos, photo_paths
from svhn.errors import SettingError, SvhnError, command, stop_on_sigterm
from svhn.inference.checkpoints import load_reader
from svhn.inference.predictor import PREDICT_BATCH_SIZE, evaluation_sizes
from svhn.model.reader import SEARCH_GATE, DigitReader
from svhn.tempfiles import refuse_existing, write_all_or_none

__all__ = ["DECODING_RULE", "EXPORT_EXTRA", "EXPORT_PACKAGES",
           "export_onnx", "generated_photos", "main", "MissingExtraError", "onnx_session",
           "OnnxReader", "OPSET", "Parity", "parity", "read_with_onnx", "read_with_torch",
           "require_export_packages", "sidecar_path"]

# Resize with antialias (the reader's first resize of a larger input) is opset 18's.
OPSET = 18
EXPORT_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
EXPORT_EXTRA = 'pip install "svhn[export]"'
DECODING_RULE = ("Per position, the class of highest probability; class 10 is blank. Drop "
                 "the blanks wherever they stand and keep the digits in order ([1, 10, 2, "
                 "10, 10] reads 12). A reading of blanks only writes one digit: the digit "
                 "whose highest probability over all positions is largest. Confidence: the "
                 "product over positions of each position's highest probability.")
_GENERATED_CHECK = 16  # house numbers drawn for the check when no --check is given
_SHOWN_DIFFERENCES = 20


class MissingExtraError(SvhnError, ImportError):
    """A package an optional part of the project needs is not installed."""


def require_export_packages(what: str = "python -m svhn.export") -> None:
    """``MissingExtraError`` naming the extra to install when onnx, onnxruntime or
    onnxscript cannot be imported."""
    missing = []
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}, which "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                f"{EXPORT_EXTRA} (in a checkout: pip install -e \".[export]\").")


def sidecar_path(model: str | Path) -> Path:
    """``reader.json`` beside ``reader.onnx``."""
    return Path(model).with_suffix(".json")


# -- the exported module --------------------------------------------------------------------
class OnnxReader(nn.Module):
    """A reader's ``forward`` as a tuple of tensors (what ONNX outputs are): ``probs``, then
    ``box`` and ``char_boxes`` where the reader has them. ``search``: the full zoom search
    (the reader must be loaded with ``zoom_search`` and ``search_gate`` 1)."""

    def __init__(self, reader: DigitReader, search: bool = False):
        super().__init__()
        self.reader = reader
        self.search = search
        self.output_names = ["probs"]
        if reader.box_regressor is not None:
            self.output_names.append("box")
        if reader.char_box_regressor is not None or reader.detector is not None:
            self.output_names.append("char_boxes")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.reader(images, search=self.search)
        values = {"probs": out["logits"].float().softmax(-1)}
        for name in self.output_names[1:]:
            values[name] = out[name].float()
        return tuple(values[name] for name in self.output_names)


def _stable_sort_translation() -> dict:
    """ONNX for ``sort(stable=True)`` (the detector orders its digits left to right with a
    stable argsort, which the installed exporter does not translate): TopK over the whole
    axis, whose ties keep the lower index first, as a stable sort does."""
    from onnxscript import opset18 as op

    def sort_stable(self, stable: bool | None = None, dim: int = -1,
                    descending: bool = False):
        size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, size, axis=dim, largest=descending, sorted=True)

    return {torch.ops.aten.sort.stable: sort_stable}


def export_onnx(reader: DigitReader, input_size: tuple[int, int], search: bool = False,
                opset: int = OPSET) -> tuple[bytes, list[str]]:
    """The reader (eval mode, float32, CPU) as an ONNX model with a free batch size, and
    its output names. Traced with ``torch.export`` in strict mode: the reader's Python
    (``len`` of a batch, say) then stays symbolic instead of fixing the batch."""
    require_export_packages()
    module = OnnxReader(reader.float().eval(), search)
    # Batch 2: an example batch of 1 would be taken for a constant.
    example = (torch.zeros((2, 3, *input_size), dtype=torch.uint8),)
    batch = torch.export.Dim("batch")
    # Each zoom step's crops in one read: the reader's loop over reads of a few crops would
    # fix the exported batch; one read gives the same numbers (each crop is read on its own).
    before, reader.search_crops_per_read = reader.search_crops_per_read, 0
    try:
        with torch.no_grad():
            program = torch.export.export(module, example,
                                          dynamic_shapes={"images": {0: batch}}, strict=True)
    finally:
        reader.search_crops_per_read = before
    onnx_program = torch.onnx.export(
        program, example, input_names=["images"], output_names=module.output_names,
        opset_version=opset, dynamo=True, verbose=False,
        custom_translation_table=_stable_sort_translation())
    with tempfile.TemporaryDirectory(prefix="svhn-export-") as folder:
        path = Path(folder) / "reader.onnx"
        onnx_program.save(path, external_data=False)
        return path.read_bytes(), module.output_names


def onnx_session(model: bytes | str | Path, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU (``threads``: its intra-op threads; None: its own
    choice, one per physical core)."""
    require_export_packages()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def read_with_onnx(session: Any, images: torch.Tensor, batch_size: int = PREDICT_BATCH_SIZE
                   ) -> dict[str, torch.Tensor]:
    """Every output of the ONNX model for uint8 (N, 3, H, W) ``images``, read in batches."""
    names = [output.name for output in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size].numpy()
        for name, value in zip(names, session.run(names, {"images": batch})):
            parts[name].append(value)
    return {name: torch.from_numpy(np.concatenate(values)) for name, values in parts.items()}


def read_with_torch(reader: DigitReader, images: torch.Tensor,
                    batch_size: int = PREDICT_BATCH_SIZE, search: bool = False
                    ) -> dict[str, torch.Tensor]:
    """What the exported model answers, from the PyTorch reader itself (its own forward,
    not the exported module): ``probs`` and, where it has them, ``box`` and ``char_boxes``."""
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for first in range(0, len(images), batch_size):
            out = reader(images[first:first + batch_size], search=search)
            values = {"probs": out["logits"].float().softmax(-1)}
            values.update({key: out[key].float() for key in ("box", "char_boxes")
                           if key in out})
            for key, value in values.items():
                parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


# -- the check ------------------------------------------------------------------------------
@dataclass
class Parity:
    """How the ONNX model's readings compare with the PyTorch reader's on the same images."""

    images: int
    strings_agree: int
    max_abs_diff_probs: float
    source: str  # what was read: the --check paths, or generated house numbers
    # name, PyTorch's string, the ONNX model's, the smallest top-2 margin over positions
    differ: list[tuple[str, str, str, float]] = field(default_factory=list)

    @property
    def differing(self) -> int:
        return self.images - self.strings_agree

    def lines(self) -> list[str]:
        lines = [f"Check on {self.images} {self.source}: {self.strings_agree} of {self.images} "
                 f"readings agree ({self.differing} differ); largest difference of the "
                 f"probabilities {self.max_abs_diff_probs:.2e}."]
        for name, torch_says, onnx_says, margin in self.differ[:_SHOWN_DIFFERENCES]:
            lines.append(f"  {name}: PyTorch {torch_says}, ONNX {onnx_says} (top-2 margin "
                         f"{margin:.2e})")
        if self.differing > _SHOWN_DIFFERENCES:
            lines.append(f"  ... and {self.differing - _SHOWN_DIFFERENCES} more.")
        return lines


def _top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """(N,) each reading's smallest gap between its two likeliest classes over positions."""
    top = probs.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).amin(-1)


def parity(names: Sequence[str], torch_probs: torch.Tensor, onnx_probs: torch.Tensor,
           source: str) -> Parity:
    """Compare the two readings of the same images, as the submission writes them."""
    expected, found = decode_probabilities(torch_probs), decode_probabilities(onnx_probs)
    margins = _top2_margin(torch_probs).tolist()
    differ = [(Path(name).name, a, b, margin)
              for name, a, b, margin in zip(names, expected, found, margins) if a != b]
    diff = float((torch_probs - onnx_probs).abs().max()) if len(names) else 0.0
    return Parity(images=len(names), strings_agree=len(names) - len(differ),
                  max_abs_diff_probs=diff, source=source, differ=differ)


def generated_photos(count: int, cache_size: tuple[int, int], input_size: tuple[int, int],
                     seed: int = 0) -> Photos:
    """``count`` generated house numbers (``svhn.data.synthetic``), written as PNGs and
    decoded as photos are (``decode_photos``)."""
    from svhn.data.synthetic import render_number, sample_digits

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="svhn-export-check-") as folder:
        paths = []
        for index in range(count):
            image, _ = render_number(sample_digits(rng), rng)
            paths.append(Path(folder) / f"generated_{index:03d}.png")
            image.save(paths[-1])
        return decode_photos(paths, cache_size, input_size, progress=False)


def _check_photos(inputs: Sequence[Path] | None, cache_size: tuple[int, int],
                  input_size: tuple[int, int]) -> tuple[Photos, str]:
    if not inputs:
        return (generated_photos(_GENERATED_CHECK, cache_size, input_size),
                "generated house numbers")
    photos = decode_photos(photo_paths(inputs), cache_size, input_size)
    for why in photos.failed.values():
        print(f"not checked: {why}")
    if not photos.names:
        raise SettingError(f"--check: none of the {len(photos.failed)} image file(s) could "
                           "be read; name images that open.")
    return photos, "--check images"


# -- the sidecar ----------------------------------------------------------------------------
def _included(reader: DigitReader, search: bool) -> dict[str, Any]:
    detector = reader.detector is not None
    return {
        "head": "detector" if detector else "positions",
        "detector_decoding": detector,  # NMS, left to right, the presence rule: in the graph
        "detect_threshold": reader.detect_threshold if detector else None,
        "zoom_steps": reader.zoom_steps,
        "zoom_from": reader.zoom_from if reader.zoom_steps else None,
        "zoom_search": "full (29 chains, the vote)" if search else None,
    }


def _left_out(contents: CheckpointContents, search: bool) -> list[str]:
    """What ``svhn.predict`` does with this checkpoint that the model does not."""
    settings = contents.model
    left = []
    if settings.get("zoom_search") and not search:
        left.append("the zoom search: svhn.predict starts 28 more zoom chains on the images "
                    "its first two chains are unsure of and votes (search_gate "
                    f"{settings.get('search_gate', SEARCH_GATE):g}); this model reads one "
                    "chain, as validation does (--search exports the full search)")
    if search and (settings.get("search_gate", SEARCH_GATE) < 1
                   or settings.get("search_majority") is not None
                   or settings.get("search_merge") is not None):
        left.append("the gated search's shortcuts (search_gate, search_majority, "
                    "search_merge): every image gets all 29 chains, as svhn.predict "
                    "--full_search reads")
    left.append("test-time views (svhn.predict --tta) and ensembles of checkpoints")
    return left


def _sidecar(contents: CheckpointContents, reader: DigitReader, model_name: str,
             output_names: list[str], sizes: tuple[tuple[int, int], tuple[int, int]],
             search: bool, opset: int, check: Parity) -> dict[str, Any]:
    cache_size, input_size = sizes
    max_len = reader.max_len
    shapes = {"probs": ["N", max_len, NUM_CLASSES], "box": ["N", 4],
              "char_boxes": ["N", max_len, 4]}
    meaning = {
        "probs": "each position's probabilities of the digits 0-9 and blank (10)",
        "box": "the number's box (x0, y0, x1, y1), fractions of the input image",
        "char_boxes": "each position's digit box (x0, y0, x1, y1), fractions of the input "
                      "image (a blank position's box means nothing)",
    }
    return {
        "model": model_name,
        "checkpoint": str(contents.path.resolve()),
        "epoch": contents.epoch,
        "opset": opset,
        "exported_with": {"torch": torch.__version__},
        "precision": "float32",
        "trained_precision": contents.precision,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "shape": ["N", 3, *input_size], "height": input_size[0],
                  "width": input_size[1]},
        "preprocessing": {
            "cache_size": list(cache_size), "input_size": list(input_size),
            "image_size": list(reader.image_size),
            "steps": [
                "open the file; a JPEG is drafted (Pillow's draft('RGB', (s, s)), s the "
                "larger side of cache_size) before anything else",
                "turn it upright as its EXIF orientation says (ImageOps.exif_transpose)",
                "convert to RGB (16-bit grey: its top 8 bits)",
                "resize to cache_size (height, width) with Pillow's bilinear filter",
                "resize to input_size with OpenCV's cv2.resize INTER_LINEAR (nothing to do "
                "when the two sizes are equal)",
                "uint8 HWC -> CHW, batched: the model normalises and, when input_size is "
                "larger than image_size, resizes for its first read itself",
            ],
        },
        "outputs": {name: {"shape": shapes[name], "meaning": meaning[name]}
                    for name in output_names},
        "max_len": max_len,
        "num_classes": NUM_CLASSES,
        "blank": BLANK,
        "decoding": DECODING_RULE,
        "included": _included(reader, search),
        "left_out": _left_out(contents, search),
        "check": asdict(check),
    }


# -- the command ----------------------------------------------------------------------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.export", allow_abbrev=False,
        description="Export a checkpoint's reader to ONNX (one zoom chain, as validation "
                    "reads; the detector's decoding included), with a sidecar JSON saying "
                    "how to feed and decode it, checked against the PyTorch reader under "
                    "onnxruntime before anything is written.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint svhn.fit wrote")
    parser.add_argument("--out", type=Path, required=True,
                        help="the model, e.g. reader.onnx (the sidecar: reader.json beside it)")
    parser.add_argument("--check", type=Path, nargs="+", default=None, metavar="IMAGE_OR_FOLDER",
                        help="images (or folders of them) both readers read to compare "
                             f"(default: {_GENERATED_CHECK} generated house numbers)")
    parser.add_argument("--strict", action="store_true",
                        help="any reading that differs: exit 1 and write nothing")
    parser.add_argument("--search", action="store_true",
                        help="export the full zoom search (29 chains per image and the vote, "
                             "as svhn.predict --full_search) instead of one chain")
    parser.add_argument("--batch_size", type=int, default=PREDICT_BATCH_SIZE,
                        help="images per read in the check")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".onnx":
        raise SettingError(f"--out {args.out}: name the model with .onnx (its sidecar is the "
                           "same name with .json).")
    if args.batch_size < 1:
        raise SettingError(f"--batch_size {args.batch_size}: must be at least 1.")
    return args


def _load(contents: CheckpointContents, search: bool) -> DigitReader:
    if not search:
        return load_reader(contents, zoom_search=False)
    if not contents.model.get("zoom_steps"):
        raise SettingError(f"--search: {contents.path} reads no zoom chains (zoom_steps 0), "
                           "so it has no search to export; drop --search.")
    return load_reader(contents, zoom_search=True, search_gate=1.0)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    require_export_packages()
    out, side = args.out, sidecar_path(args.out)
    refuse_existing([out, side], args.overwrite)
    with stop_on_sigterm("export stopped; nothing was written."):
        contents = read_checkpoint(args.checkpoint)
        sizes = evaluation_sizes(contents)
        photos, source = _check_photos(args.check, *sizes)  # a bad --check path: before work
        reader = _load(contents, args.search)
        what = "the full zoom search" if args.search else (
            f"one zoom chain ({reader.zoom_steps} crop reads)" if reader.zoom_steps
            else "one read")
        print(f"Exporting {contents.path.name}: {what}, input uint8 N x 3 x {sizes[1][0]} x "
              f"{sizes[1][1]}, opset {OPSET} ...", flush=True)
        start = time.perf_counter()
        model, names = export_onnx(reader, sizes[1], search=args.search)
        print(f"Exported in {time.perf_counter() - start:.0f} s; outputs: {', '.join(names)}.",
              flush=True)
        expected = read_with_torch(reader, photos.images, args.batch_size, args.search)
        found = read_with_onnx(onnx_session(model), photos.images, args.batch_size)
        check = parity(photos.names, expected["probs"], found["probs"], source)
    for line in check.lines():
        print(line)
    if args.strict and check.differing:
        print(f"{check.differing} of {check.images} readings differ and --strict is given: "
              "nothing was written.", file=sys.stderr, flush=True)
        return 1
    info = _sidecar(contents, reader, out.name, names, sizes, args.search, OPSET, check)
    write_all_or_none({out: lambda tmp: tmp.write_bytes(model),
                       side: lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n")},
                      overwrite=args.overwrite)
    for line in _left_out(contents, args.search):
        print(f"Not in the model: {line}")
    print(f"Wrote {out} ({len(model) / 1e6:.1f} MB) and {side}.")
    print(f"Read photos without PyTorch: python examples/read_with_onnxruntime.py {out} "
          "IMAGE_OR_FOLDER ...")
    return 0
