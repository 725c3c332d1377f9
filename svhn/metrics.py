"""Sequence metrics (torchmetrics, so they are exact under DDP)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from svhn.labels import NUM_CLASSES, canonical_predictions


def whole_string_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image: 1.0 when the decoded string is exactly the label (the competition score),
    decoded as the submission decodes it."""
    predicted = canonical_predictions(logits.float().softmax(-1))
    return (predicted == targets).all(dim=1).float()


class SequenceMetrics(nn.Module):
    """seq_acc (whole string right, as the competition scores it), char_acc, per position."""

    def __init__(self, max_len: int):
        super().__init__()
        self.seq_acc = MeanMetric()
        self.char_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.pos_acc = nn.ModuleList(
            MulticlassAccuracy(NUM_CLASSES, average="micro") for _ in range(max_len))

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.seq_acc.update(whole_string_correct(logits, targets))
        classes = logits.argmax(-1)
        self.char_acc.update(classes.flatten(), targets.flatten())
        for position, metric in enumerate(self.pos_acc):
            metric.update(classes[:, position], targets[:, position])

    def loggable(self, stage: str) -> dict[str, object]:
        out: dict[str, object] = {f"{stage}/seq_acc": self.seq_acc,
                                  f"{stage}/char_acc": self.char_acc}
        for position, metric in enumerate(self.pos_acc):
            out[f"{stage}/pos{position}_acc"] = metric
        return out
