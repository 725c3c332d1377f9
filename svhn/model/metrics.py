"""Sequence metrics (torchmetrics, so they are exact under DDP)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from svhn.data.labels import NUM_CLASSES, canonical_predictions

__all__ = ["SequenceMetrics", "whole_string_correct"]


def whole_string_correct(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image: 1.0 when the string decoded from (B, max_len, 11) probabilities, as the
    submission decodes it, is exactly the label (the competition's score); the one owner
    of whole-string accuracy (training metrics, svhn.analysis.tables)."""
    return (canonical_predictions(probs.float()) == targets).all(dim=1).float()


class SequenceMetrics(nn.Module):
    """From logits: seq_acc (whole string right, as the competition scores it),
    position_acc (every position's class right, blanks included: not svhn.score's char_acc,
    which compares the written strings) and each position's own accuracy."""

    def __init__(self, max_len: int):
        super().__init__()
        # No input checks: each one reads a value back from the device on every step (the
        # values are 0/1 and class indices made here, not user input).
        self.seq_acc = MeanMetric(nan_strategy="disable")
        self.position_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.pos_acc = nn.ModuleList(
            MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
            for _ in range(max_len))

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.seq_acc.update(whole_string_correct(logits.float().softmax(-1), targets))
        classes = logits.argmax(-1)
        self.position_acc.update(classes.flatten(), targets.flatten())
        for position, metric in enumerate(self.pos_acc):
            metric.update(classes[:, position], targets[:, position])

    def loggable(self, stage: str) -> dict[str, object]:
        out: dict[str, object] = {f"{stage}/seq_acc": self.seq_acc,
                                  f"{stage}/position_acc": self.position_acc}
        for position, metric in enumerate(self.pos_acc):
            out[f"{stage}/pos{position}_acc"] = metric
        return out
