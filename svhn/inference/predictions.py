"""What prediction returns: ``Predictions`` in file-name order, and the pieces that join them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svhn.data.layout import SPLITS
from svhn.errors import SettingError
from svhn.inference.views import PLAIN_VIEWS

__all__ = ["any_searched", "cat_or_none", "merge_sorted", "Predictions"]


# -- what comes out ---------------------------------------------------------------------------
@dataclass
class Predictions:
    """Per-image outputs in file-name order: probabilities (N, max_len, 11), boxes (N, 4)
    when the readers predict them, targets (N, max_len) when the split is labelled; with
    the zoom search, every zoom chain's probabilities (N, K, max_len, 11) and final box
    (N, K, 4), whose vote gave ``probs`` and ``boxes``, and which images the gated search
    searched (``searched`` (N,) bool; the others answer with their first two chains).
    Asked for (``digit_boxes``), each position's own box (``char_boxes`` (N, max_len, 4)) and,
    with the search, every chain's (``chain_char_boxes`` (N, K, max_len, 4))."""

    file_names: list[str]
    probs: torch.Tensor
    boxes: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    chain_probs: torch.Tensor | None = None
    chain_boxes: torch.Tensor | None = None
    searched: torch.Tensor | None = None
    char_boxes: torch.Tensor | None = None
    chain_char_boxes: torch.Tensor | None = None
    checkpoints: list[Path] = field(default_factory=list)
    data_dir: Path | None = None
    split: str | None = None
    views: tuple[str, ...] = PLAIN_VIEWS

    def __len__(self) -> int:
        return len(self.file_names)

    @property
    def checkpoint(self) -> Path:
        """The first (or only) checkpoint: its run holds the training curves."""
        return self.checkpoints[0]

    @property
    def image_paths(self) -> list[Path]:
        if self.data_dir is None or self.split is None:
            raise SettingError("these predictions do not say which data they came from.")
        folder = Path(self.data_dir) / SPLITS[self.split][0]
        return [folder / name for name in self.file_names]


def cat_or_none(tensors: Sequence[torch.Tensor | None], dim: int = 0) -> torch.Tensor | None:
    if not tensors or any(t is None for t in tensors):
        return None
    return torch.cat(tensors, dim=dim)  # type: ignore[arg-type]


def any_searched(flags: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Where any of several readings (views, ensemble members) ran the gated search: (N,)
    bool, or None when one of them does not say."""
    if not flags or any(flag is None for flag in flags):
        return None
    return torch.stack(flags).any(0)  # type: ignore[arg-type]


def merge_sorted(parts: Sequence[Predictions], expected: Sequence[str]) -> Predictions:
    """One Predictions in file-name order; each expected image exactly once (else an error)."""
    parts = [p for p in parts if p.file_names]
    names = [n for p in parts for n in p.file_names]
    if sorted(names) != sorted(expected):
        raise RuntimeError(f"prediction returned {len(names)} rows ({len(set(names))} distinct) "
                           f"for {len(expected)} images; each image must appear exactly once.")
    order = sorted(range(len(names)), key=names.__getitem__)

    def ordered(key: str) -> torch.Tensor | None:
        joined = cat_or_none([getattr(p, key) for p in parts])
        return joined[order] if joined is not None else None

    return Predictions(file_names=[names[i] for i in order],
                       probs=torch.cat([p.probs for p in parts])[order],
                       boxes=ordered("boxes"), targets=ordered("targets"),
                       chain_probs=ordered("chain_probs"), chain_boxes=ordered("chain_boxes"),
                       searched=ordered("searched"), char_boxes=ordered("char_boxes"),
                       chain_char_boxes=ordered("chain_char_boxes"))
