"""Logits that read given classes with a given confidence."""

from __future__ import annotations

import math

import torch


def reading_logits(readings: list[list[int]], confidence: float, max_len: int = 3
                   ) -> torch.Tensor:
    """(B, max_len, 11) logits reading each list of classes with top probability
    ``confidence`` at every position."""
    logits = torch.full((len(readings), max_len, 11), math.log((1 - confidence) / 10))
    for row, classes in enumerate(readings):
        for position, cls in enumerate(classes):
            logits[row, position, cls] = math.log(confidence)
    return logits
