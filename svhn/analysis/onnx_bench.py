"""The exported reader against the PyTorch reader: ``python -m svhn.bench --onnx CKPT
[--data_dir DIR --split val] [--search_onnx]``.

The checkpoint's reader is exported as ``svhn.export`` exports it (one zoom chain; with
``--search_onnx`` the full zoom search), and both read the same decoded images (the split's
files decoded as ``svhn.export --check`` decodes them, at the checkpoint's evaluation size;
without ``--data_dir``, generated house numbers): PyTorch in float32 through the reader's own
``forward``, onnxruntime on the CPU with as many intra-op threads as torch has. The two take
turns, pass by pass (a shared machine's changing load falls on both alike), after one
warm-up pass each; each pass reads every image in batches of ``--batch_size`` (svhn.predict's
by default), and its median time over ``--repeats`` passes is kept. Decoding the files is
timed apart, once: it is the same for both. The report also says how many readings agree,
and on a labelled split the score of each.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from svhn.checkpoint_format import read_checkpoint
from svhn.data.labels import decode_probabilities
from svhn.data.layout import list_split
from svhn.data.photos import decode_photos
from svhn.inference.checkpoints import load_reader
from svhn.inference.export import (
    export_onnx,
    generated_photos,
    onnx_session,
    parity,
    read_with_onnx,
    read_with_torch,
)
from svhn.inference.predictor import PREDICT_BATCH_SIZE, evaluation_sizes
from svhn.inference.scoring import score_submission
from svhn.inference.submission import build_submission

__all__ = ["format_onnx_table", "GENERATED_IMAGES", "measure_onnx"]

GENERATED_IMAGES = 256  # read when no --data_dir is given


def measure_onnx(checkpoint: str | Path, data_dir: str | Path | None = None,
                 split: str = "val", batch_size: int = PREDICT_BATCH_SIZE, repeats: int = 3,
                 search: bool = False) -> dict:
    """Images/s of the PyTorch reader and of its ONNX export under onnxruntime over one
    split (or generated images), each the median of ``repeats`` passes taking turns."""
    contents = read_checkpoint(checkpoint)
    cache_size, input_size = evaluation_sizes(contents)
    start = time.perf_counter()
    samples = None
    if data_dir is None:
        photos = generated_photos(GENERATED_IMAGES, cache_size, input_size)
        source = f"{GENERATED_IMAGES} generated house numbers"
    else:
        files = list_split(data_dir, split)
        photos = decode_photos(files.image_paths, cache_size, input_size, progress=False)
        source = f"{data_dir} {split}"
        samples = files.samples
    decode_seconds = time.perf_counter() - start
    images = photos.images
    reader = load_reader(contents, zoom_search=search, search_gate=1.0 if search else None)
    start = time.perf_counter()
    model, _ = export_onnx(reader, input_size, search=search)
    export_seconds = time.perf_counter() - start
    threads = torch.get_num_threads()
    session = onnx_session(model, threads=threads)
    passes = {
        "torch": lambda: read_with_torch(reader, images, batch_size, search)["probs"],
        "onnxruntime": lambda: read_with_onnx(session, images, batch_size)["probs"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    probs = {name: run() for name, run in passes.items()}  # the warm-up passes
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    check = parity(photos.names, probs["torch"], probs["onnxruntime"], source)
    report = {
        "checkpoint": str(checkpoint), "source": source, "images": len(images),
        "read": "full zoom search" if search else "one chain",
        "input_size": list(input_size), "batch_size": batch_size, "repeats": repeats,
        "threads": threads, "decode_s": decode_seconds, "export_s": export_seconds,
        "model_mb": len(model) / 1e6,
        "strings_agree": check.strings_agree, "max_abs_diff_probs": check.max_abs_diff_probs,
        "differ": check.differ,
    }
    for name, runs in seconds.items():
        median = statistics.median(runs)
        report[name] = {"seconds": median, "seconds_each": runs,
                        "images_per_s": len(images) / median}
        if samples is not None:  # scored as svhn.score scores a submission
            submission = build_submission([Path(path).name for path in photos.names],
                                          decode_probabilities(probs[name]))
            report[name]["score"] = score_submission(submission, samples).seq_acc
    report["speedup"] = report["torch"]["seconds"] / report["onnxruntime"]["seconds"]
    return report


def format_onnx_table(report: dict) -> str:
    lines = [
        f"{Path(report['checkpoint']).name}, {report['read']}, on {report['source']} "
        f"({report['images']} images at {report['input_size'][0]}x{report['input_size'][1]}, "
        f"batch {report['batch_size']}, {report['threads']} threads; each pass's median of "
        f"{report['repeats']}):",
    ]
    for name in ("torch", "onnxruntime"):
        row = report[name]
        score = f"  score {row['score']:.3f}" if "score" in row else ""
        lines.append(f"  {name:<12} {row['images_per_s']:7.1f} images/s{score}")
    lines += [
        f"  onnxruntime / torch: {report['speedup']:.2f}x",
        f"  readings that agree: {report['strings_agree']} of {report['images']}; largest "
        f"difference of the probabilities {report['max_abs_diff_probs']:.2e}",
        f"  (decoding the files, the same for both: {report['decode_s']:.1f} s; the export: "
        f"{report['export_s']:.0f} s, {report['model_mb']:.1f} MB)",
    ]
    return "\n".join(lines)
