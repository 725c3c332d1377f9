"""Box geometry on normalised (x0, y0, x1, y1) boxes, the one owner of every box operation:
boxes grown by a margin, crops around boxes, boxes mapped between a crop and its image,
overlaps. Used by the reader (zoom), the batch augmentation and the albumentations presets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import roi_align

__all__ = ["box_from_crop", "crop_boxes", "crop_region", "grow_box", "leader_boxes",
           "paired_iou", "pairwise_iou", "union_boxes"]


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """(K, K, B) intersection over union of every pair of (K, B, 4) boxes, per image."""
    boxes = boxes.float()
    low = torch.maximum(boxes[:, None, :, :2], boxes[None, :, :, :2])
    high = torch.minimum(boxes[:, None, :, 2:], boxes[None, :, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)  # (K, B)
    return inter / (area[:, None] + area[None] - inter).clamp(min=1e-9)


def paired_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N,) intersection over union of box i of ``first`` with box i of ``second`` ((N, 4)
    each): ``pairwise_iou`` of the two, without the pairs that are not wanted."""
    return pairwise_iou(torch.stack([first, second]))[0, 1]


def leader_boxes(boxes: torch.Tensor, min_iou: float, skip: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of (K, B, 4) boxes (K per image, B images) stand for the others: box k of an
    image follows the first earlier leader of that image it overlaps by at least
    ``min_iou``, and leads if there is none (greedy leader clustering, so a box always
    overlaps its own leader by ``min_iou``). A box where ``skip`` (K, B) is true neither
    leads nor follows. Returns ``leaders``, the flat (k * B + b) indices of the leaders, in
    order, and ``follows`` (K * B,): each box's leader's place in ``leaders`` (0 for a
    skipped box: its caller keeps what it had)."""
    count, batch = boxes.shape[:2]
    near = pairwise_iou(boxes) >= min_iou  # (K, K, B)
    takes_part = torch.ones(count, batch, dtype=torch.bool, device=boxes.device) \
        if skip is None else ~skip
    leads = takes_part.clone()
    leader = torch.arange(count, device=boxes.device)[:, None].repeat(1, batch)
    for k in range(1, count):  # K is the chains of one call (<= 29): a short loop
        earlier = near[k, :k] & leads[:k]  # (k, B)
        found = earlier.any(0) & takes_part[k]
        leads[k] &= ~found
        leader[k] = torch.where(found, earlier.byte().argmax(0), k)
    flat_leads = leads.flatten()
    place = flat_leads.long().cumsum(0) - 1  # a leader's place among the leaders
    own = leader * batch + torch.arange(batch, device=boxes.device)  # flat index of the leader
    return flat_leads.nonzero().squeeze(1), place[own.flatten()].clamp(min=0)


def union_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The union boxes crops are cut around: (B, 4) as given, or the first of (B, K, 4)."""
    return boxes[:, 0] if boxes.ndim == 3 else boxes


def grow_box(boxes: torch.Tensor | Sequence[float], margin: float,
             min_size: float = 0.0) -> torch.Tensor | tuple[float, float, float, float]:
    """Boxes grown by ``margin`` of their size per side about their centre (each side at
    least ``min_size`` of the image before growing), clipped to the image: (B, 4) tensors
    (float32 at least: bf16 boxes from autocast are too coarse for pixel positions), or one
    box of 4 numbers as a tuple (the per-image albumentations path, where building a tensor
    would cost more than the augmentation)."""
    if not isinstance(boxes, torch.Tensor):
        x0, y0, x1, y1 = (float(v) for v in boxes)
        width = max(x1 - x0, min_size) * (1 + 2 * margin)
        height = max(y1 - y0, min_size) * (1 + 2 * margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return tuple(min(max(v, 0.0), 1.0) for v in (cx - width / 2, cy - height / 2,
                                                     cx + width / 2, cy + height / 2))
    boxes = boxes.detach().to(torch.promote_types(boxes.dtype, torch.float32))
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=min_size) * (1 + 2 * margin)
    return torch.cat([centre - size / 2, centre + size / 2], dim=1).clamp(0, 1)


# -- zoom geometry -------------------------------------------------------------------------
def crop_region(boxes: torch.Tensor, margin: float, min_size: float = 0.1) -> torch.Tensor:
    """The normalised region ``crop_boxes`` cuts: each box grown by ``margin`` of its size
    per side (at least ``min_size`` of the image), clipped to the image."""
    return grow_box(boxes, margin, min_size)


def box_from_crop(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Boxes predicted inside crops of ``regions`` (B, 4) -> normalised whole-image
    coordinates; ``boxes`` (B, 4), or (B, K, 4): K boxes per crop."""
    if boxes.ndim == 3:
        regions = regions[:, None]
    origin, extent = regions[..., :2], regions[..., 2:] - regions[..., :2]
    return torch.cat([origin + boxes[..., :2] * extent, origin + boxes[..., 2:] * extent],
                     dim=-1)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, margin: float,
               output_size: tuple[int, int], min_size: float = 0.1,
               image_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image around its normalised (x0, y0, x1, y1) box, grown by ``margin`` of
    its size per side, and resample the crop to ``output_size`` (bilinear). With
    ``image_rows`` (N,), box i is cut from image ``image_rows[i]``: N crops, many from one
    image, with no copy of the images."""
    height, width = images.shape[-2:]
    x0, y0, x1, y1 = crop_region(boxes, margin, min_size).unbind(1)
    # Scaled by Python numbers: a (4,) scale tensor would be a host-to-device copy on every
    # crop, and the zoom search cuts 29 per step.
    index = torch.arange(len(images), device=images.device) if image_rows is None else \
        image_rows
    index = index.to(torch.float32)
    rois = torch.stack([index, x0 * width, y0 * height, x1 * width, y1 * height],
                       dim=1).to(images.dtype)
    return roi_align(images, rois, output_size=tuple(output_size), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)
