"""Test-time views: affine views of the input whose boxes map back to the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svhn.errors import SettingError

__all__ = ["AffineView", "check_views", "PLAIN_VIEWS", "TTA_VIEWS", "VIEWS"]


# -- views (test-time augmentation) ---------------------------------------------------------
@dataclass(frozen=True)
class AffineView:
    """Zoom about the centre by ``scale``, move right by ``shift_x`` of the width; the
    border pixels are repeated so no black edges appear (the model never saw any)."""

    scale: float = 1.0
    shift_x: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0 and self.shift_x == 0.0:
            return images
        theta = images.new_tensor([[1 / self.scale, 0.0, -2 * self.shift_x],
                                   [0.0, 1 / self.scale, 0.0]])
        grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape),
                             align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def box_to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised (x0, y0, x1, y1) boxes found in this view -> the same places in the
        original image (so chains of different views can be compared by overlap)."""
        # The view samples the image at u / scale - 2 * shift_x, u in [-1, 1] coordinates.
        x = ((2 * boxes[..., 0::2] - 1) / self.scale - 2 * self.shift_x + 1) / 2
        y = ((2 * boxes[..., 1::2] - 1) / self.scale + 1) / 2
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


# Deterministic views of the normalised image batch. For readers without the zoom search,
# the first view of a list is the one whose box (with a box head) is reported.
VIEWS: dict[str, AffineView] = {
    "identity": AffineView(),
    "shift_left": AffineView(shift_x=-0.04),
    "shift_right": AffineView(shift_x=0.04),
    "zoom_in": AffineView(scale=1.08),
    "zoom_out": AffineView(scale=0.92),
}
PLAIN_VIEWS = ("identity",)
TTA_VIEWS = tuple(VIEWS)


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise SettingError(f"unknown views {unknown}; choose from {sorted(VIEWS)}.")
    return tuple(views)
