"""Synthetic pictures for the augmentation tests, and where their bright pixels ended up."""

from __future__ import annotations

import torch


def rectangles(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Dark uint8 images with a bright rectangle filling each normalised box."""
    height, width = size
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    inside = (xs >= x0) & (xs <= x1) & (ys[:, None] >= y0) & (ys[:, None] <= y1)
    images = torch.where(inside, 230, 20).to(torch.uint8)
    return images[:, None].expand(-1, 3, -1, -1).contiguous()


def bright_extent(images: torch.Tensor) -> torch.Tensor:
    """The normalised bounding box of each image's bright pixels (pixel edges)."""
    height, width = images.shape[-2:]
    bright = images[:, 0] > 125
    rows, cols = bright.any(2), bright.any(1)
    first = lambda m: m.float().argmax(1)  # noqa: E731
    last = lambda m: m.shape[1] - 1 - m.flip(1).float().argmax(1)  # noqa: E731
    return torch.stack([first(cols) / width, first(rows) / height,
                        (last(cols) + 1) / width, (last(rows) + 1) / height], 1)
