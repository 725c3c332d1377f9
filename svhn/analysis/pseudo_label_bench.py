"""How well a teacher's confidence picks right answers, and what its reading pass costs:
``python -m svhn.bench --pseudo_labels CKPT --data_dir DIR [--split val] [--single_read]``.

The checkpoint reads the split as a pseudo-labelling round of ``svhn.fit`` reads
``--data.unlabelled`` images (``svhn.predict``'s path: its zoom search, or one chain with
``--single_read``), timed. On a labelled split treated as if it had no labels, each
confidence threshold (``svhn.model.vote.answer_confidence``) gets the share of images it
keeps and the share of kept answers that are right: the precision of the pseudo-labels a
round at that threshold would train on. (A round also drops readings without a digit or a
digit box; the table counts readings without a digit as not kept.) On an unlabelled split
(test_a) the table has the kept shares only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from svhn.checkpoint_format import read_checkpoint
from svhn.data.labels import BLANK
from svhn.data.layout import SPLITS
from svhn.inference.checkpoints import load_reader
from svhn.inference.predictor import (
    PREDICT_BATCH_SIZE,
    build_trainer,
    evaluation_datamodule,
    predict_with_reader,
)
from svhn.model.metrics import whole_string_correct
from svhn.model.vote import answer_confidence

__all__ = ["DEFAULT_THRESHOLDS", "format_pseudo_label_table", "measure_pseudo_labels",
           "threshold_table"]

DEFAULT_THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def threshold_table(confidence: torch.Tensor, has_digit: torch.Tensor,
                    right: torch.Tensor | None, thresholds: Sequence[float]) -> list[dict]:
    """Per threshold: images kept (confidence >= threshold and a digit read), their share,
    and with ``right`` (N,) bool the share of kept answers that are right and the share of
    all images kept and right."""
    rows = []
    for threshold in thresholds:
        kept = (confidence >= threshold) & has_digit
        row = {"threshold": threshold, "kept": int(kept.sum()),
               "kept_share": float(kept.float().mean())}
        if right is not None:
            row["precision"] = float(right[kept].float().mean()) if kept.any() else None
            row["kept_right_share"] = float((kept & right).float().mean())
        rows.append(row)
    return rows


def measure_pseudo_labels(checkpoint: str | Path, data_dir: str | Path, split: str = "val",
                          thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                          single_read: bool = False, batch_size: int = PREDICT_BATCH_SIZE,
                          num_workers: int = 0, accelerator: str = "auto") -> dict:
    """One timed reading pass of ``split`` and its threshold table (``threshold_table``)."""
    contents = read_checkpoint(checkpoint)
    labelled = SPLITS[split][1] is not None
    datamodule = evaluation_datamodule(contents, data_dir, split, batch_size=batch_size,
                                       num_workers=num_workers, labelled=labelled)
    reader = load_reader(contents, zoom_search=False if single_read else None)
    warm_up = build_trainer(accelerator, precision=contents.precision, progress_bar=False,
                            limit_batches=1)
    trainer = build_trainer(accelerator, precision=contents.precision, progress_bar=False)
    # The warm-up batch also builds the split's image cache, outside the timing.
    predict_with_reader(reader, datamodule, warm_up, subset=True)
    start = time.perf_counter()
    predictions = predict_with_reader(reader, datamodule, trainer)
    seconds = time.perf_counter() - start
    probs = predictions.probs.float()
    confidence = answer_confidence(probs, predictions.chain_probs, predictions.chain_boxes)
    has_digit = (probs.argmax(-1) != BLANK).any(-1)
    right = whole_string_correct(probs, predictions.targets).bool() if labelled else None
    return {"checkpoint": str(checkpoint), "split": split, "images": len(predictions),
            "read": "one chain" if single_read or not reader.zoom_search else "zoom search",
            "precision": contents.precision, "batch_size": batch_size, "seconds": seconds,
            "images_per_s": len(predictions) / seconds,
            "score": None if right is None else float(right.float().mean()),
            "thresholds": threshold_table(confidence, has_digit, right, thresholds)}


def format_pseudo_label_table(report: dict) -> str:
    """The report as a table a person reads."""
    score = "" if report["score"] is None else f", score {report['score']:.3f}"
    lines = [f"{Path(report['checkpoint']).name} on {report['split']} ({report['images']:,} "
             f"images, {report['read']}, {report['precision']}, batch {report['batch_size']}): "
             f"{report['seconds']:.1f} s, {report['images_per_s']:.1f} images/s{score}",
             "threshold  kept   share  right among kept  kept and right"]
    for row in report["thresholds"]:
        precision = row.get("precision")
        right = "-" if precision is None else f"{precision:.3f}"
        both = "-" if "kept_right_share" not in row else f"{row['kept_right_share']:.3f}"
        lines.append(f"{row['threshold']:>9.2f}  {row['kept']:>5,}  {row['kept_share']:>5.3f}"
                     f"  {right:>16}  {both:>14}")
    return "\n".join(lines)
