"""The digit detector: each digit found on its own, then written into the reading's positions.

A dense head over the backbone's feature maps (FCOS / CenterNet style): every cell of a
stride-8 map scores the ten digits (sigmoid focal loss) and, where a digit's centre lies,
regresses that digit's box (left, top, right, bottom distances from the cell; generalised
IoU loss). Targets come from the per-digit boxes every competition label carries.

Decoding keeps the reader's contract, so everything downstream (the zoom chain, the vote,
ensembles, the submission) reads a detector as it reads the parallel heads: the best cells
pass class-agnostic NMS (digits do not overlap, and a 6 found as a 9 at the same place is
still one digit), at most ``max_len`` of them, sorted left to right, become positions of a
(B, max_len, 11) probability table; the rest of the positions are blank.

The pieces are functions of tensors (``detection_targets``, ``detection_loss``,
``decode_detections``) so each is tested on its own; ``DetectionHead`` is the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from svhn.data.labels import BLANK

__all__ = ["DETECTION_STRIDE", "DetectionHead", "cell_centres", "decode_detections",
           "detection_loss", "detection_targets", "predicted_boxes"]

DIGITS = BLANK  # classes 0-9; the detector has no "blank" class: no detection is a blank
DETECTION_STRIDE = 8  # the finest map the head reads: 8x16 cells at 64x128
_PRIOR = 0.01  # RetinaNet's initial foreground probability: the focal loss starts calm
_CENTRE_RADIUS = 1.5  # cells around a digit's centre that learn it (FCOS centre sampling)
_NMS_IOU = 0.45


class DetectionHead(nn.Module):
    """Feature maps (finest first) -> ``class_logits`` (B, 10, h, w) and ``box_distances``
    (B, 4, h, w) at the finest map's cells: the maps are projected to ``width`` channels,
    the coarser ones upsampled and added (a one-level FPN), then two 3x3 convolutions."""

    def __init__(self, in_channels: Sequence[int], width: int = 96):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.tower = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True))
        self.classes = nn.Conv2d(width, DIGITS, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        nn.init.normal_(self.classes.weight, std=0.01)
        nn.init.constant_(self.classes.bias, -torch.log(torch.tensor((1 - _PRIOR) / _PRIOR)))

    def forward(self, maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        size = maps[0].shape[-2:]
        fused = self.lateral[0](maps[0])
        for project, coarse in zip(self.lateral[1:], maps[1:]):
            fused = fused + F.interpolate(project(coarse), size=size, mode="nearest")
        hidden = self.tower(fused)
        # Distances in cells (softplus: positive, about one cell at the start).
        return {"class_logits": self.classes(hidden),
                "box_distances": F.softplus(self.box(hidden))}


def cell_centres(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(height * width, 2) normalised (x, y) centres of a map's cells, row by row."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def predicted_boxes(box_distances: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) distances in cells -> (B, h*w, 4) normalised (x0, y0, x1, y1) boxes."""
    height, width = box_distances.shape[-2:]
    centres = cell_centres(height, width, box_distances.device)
    cell = torch.tensor([1 / width, 1 / height], device=box_distances.device)
    distances = box_distances.float().flatten(2).transpose(1, 2)  # (B, h*w, 4)
    return torch.cat([centres - distances[..., :2] * cell, centres + distances[..., 2:] * cell],
                     dim=-1)


def detection_targets(char_boxes: torch.Tensor, targets: torch.Tensor,
                      grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """What each cell of a (h, w) map should say, from (B, max_len, 4) normalised digit
    boxes and (B, max_len) targets: ``classes`` (B, 10, h, w) one-hot at the cells that
    learn a digit, ``boxes`` (B, h*w, 4) that digit's box, ``positive`` (B, h*w).

    A digit is learnt by the cells within 1.5 cells of its centre whose centre lies inside
    its box, and always by the cell holding its centre (a digit smaller than a cell still
    has one); a cell two digits claim learns the one whose centre is nearer. Positions
    without a digit, or whose box is unknown (zeros) or was cropped away, teach nothing."""
    height, width = grid
    boxes = char_boxes.float()
    known = (targets >= 0) & (targets < DIGITS) & (boxes[..., 2] > boxes[..., 0]) \
        & (boxes[..., 3] > boxes[..., 1])  # (B, L)
    centres = cell_centres(height, width, boxes.device)  # (C, 2)
    digit_centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, L, 2)
    scale = torch.tensor([width, height], device=boxes.device, dtype=torch.float32)
    offset = (centres[None, :, None] - digit_centres[:, None]) * scale  # (B, C, L, 2) in cells
    near = (offset.abs() <= _CENTRE_RADIUS).all(-1)
    inside = ((centres[None, :, None] >= boxes[:, None, :, :2])
              & (centres[None, :, None] <= boxes[:, None, :, 2:])).all(-1)
    holds_centre = (offset.abs() <= 0.5).all(-1)
    claims = known[:, None] & ((near & inside) | holds_centre)  # (B, C, L)
    distance = torch.where(claims, offset.square().sum(-1), torch.inf)
    owner = distance.argmin(-1)  # (B, C)
    positive = claims.any(-1)
    digit = torch.gather(targets.clamp(0, DIGITS - 1), 1, owner)  # (B, C)
    classes = F.one_hot(digit, DIGITS).float() * positive[..., None]
    owned = torch.gather(boxes, 1, owner[..., None].expand(-1, -1, 4))
    return {"classes": classes.transpose(1, 2).reshape(len(boxes), DIGITS, height, width),
            "boxes": owned, "positive": positive}


def detection_loss(detection: dict[str, torch.Tensor], char_boxes: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """``class_loss`` (sigmoid focal loss over every cell and digit, per digit-cell) and
    ``box_loss`` (generalised IoU at the cells that learn a digit; zero, still in the graph,
    when there is none) of a ``DetectionHead`` output."""
    logits = detection["class_logits"].float()
    wanted = detection_targets(char_boxes, targets, tuple(logits.shape[-2:]))
    positive = wanted["positive"]
    count = positive.sum().clamp(min=1)
    class_loss = sigmoid_focal_loss(logits, wanted["classes"], reduction="sum") / count
    boxes = predicted_boxes(detection["box_distances"])
    # Every cell, then kept where it learns a digit: no boolean indexing, whose size a GPU
    # would have to report back to the host.
    per_cell = generalized_box_iou_loss(boxes, wanted["boxes"], reduction="none")
    box_loss = torch.where(positive, per_cell, 0.0).sum() / count
    return {"class_loss": class_loss, "box_loss": box_loss}


def decode_detections(detection: dict[str, torch.Tensor], max_len: int, threshold: float
                      ) -> dict[str, torch.Tensor]:
    """A ``DetectionHead`` output -> the reading: ``probs`` (B, max_len, 11) and
    ``char_boxes`` (B, max_len, 4), the digits found left to right, blanks after.

    The best ``4 * max_len`` cells per image pass class-agnostic greedy NMS; of those kept, the
    ``max_len`` most confident are candidates, and a candidate scoring at least
    ``threshold`` is a digit. A candidate's score s is mapped to a presence p in [0, 1]
    that crosses 0.5 at the threshold; its position's probabilities are p x (its ten digit
    scores, normalised) and (1 - p) x (the best of them) for blank, so the position reads
    as a digit exactly when the candidate passed the threshold, and the vote's confidence
    still grows with the score. Candidates below it stay as blanks whose digit
    probabilities let an image with no digit found still answer its likeliest one."""
    scores = detection["class_logits"].float().sigmoid().flatten(2).transpose(1, 2)  # (B,C,10)
    boxes = predicted_boxes(detection["box_distances"])  # (B, C, 4)
    batch, cells = scores.shape[:2]
    best, _ = scores.max(-1)  # (B, C)
    top = min(cells, 4 * max_len)
    top_scores, top_cells = best.topk(top, dim=1)
    top_boxes = torch.gather(boxes, 1, top_cells[..., None].expand(-1, -1, 4))
    kept = _greedy_nms(top_boxes, _NMS_IOU)
    ranked = torch.where(kept, top_scores, -1.0)
    cand_scores, pick = ranked.topk(min(top, max_len), dim=1)
    cand_cells = torch.gather(top_cells, 1, pick)
    cand_boxes = torch.gather(top_boxes, 1, pick[..., None].expand(-1, -1, 4))
    cand_digits = torch.gather(scores, 1, cand_cells[..., None].expand(-1, -1, DIGITS))
    is_digit = cand_scores >= threshold
    # Left to right among the digits; the blanks after them.
    centre_x = (cand_boxes[..., 0] + cand_boxes[..., 2]) / 2
    order = torch.where(is_digit, centre_x, torch.inf).argsort(dim=1, stable=True)
    cand_scores, is_digit = cand_scores.gather(1, order), is_digit.gather(1, order)
    cand_boxes = cand_boxes.gather(1, order[..., None].expand(-1, -1, 4))
    cand_digits = cand_digits.gather(1, order[..., None].expand(-1, -1, DIGITS))
    presence = _presence(cand_scores.clamp(min=0), threshold)[..., None]
    share = cand_digits / cand_digits.sum(-1, keepdim=True).clamp(min=1e-12)
    top_share = share.amax(-1, keepdim=True)
    probs = torch.cat([share * presence, (1 - presence) * top_share], dim=-1)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    if probs.shape[1] < max_len:  # a map with fewer cells than positions
        pad = probs.new_zeros(batch, max_len - probs.shape[1], BLANK + 1)
        pad[..., BLANK] = 1.0
        probs = torch.cat([probs, pad], dim=1)
        cand_boxes = torch.cat([cand_boxes, cand_boxes.new_zeros(batch, pad.shape[1], 4)], 1)
    return {"probs": probs, "char_boxes": cand_boxes.clamp(0, 1)}


def _greedy_nms(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS over (B, K, 4) boxes already ranked best first: (B, K) kept. The same
    answer as ``torchvision.ops.batched_nms`` without its host sync (how many it keeps
    sizes its output), which a GPU would pay on every read of a zoom chain: a box is
    dropped when a kept box ranked above it overlaps it by more than ``iou_threshold``."""
    count = boxes.shape[1]
    above = torch.ones(count, count, dtype=torch.bool, device=boxes.device).triu(1)
    overlaps = (torch.vmap(box_iou)(boxes, boxes) > iou_threshold) & above  # (B, K, K)
    kept = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    for rank in range(count - 1):  # K small steps on the whole batch
        kept = kept & ~(kept[:, rank, None] & overlaps[:, rank])
    return kept


def _presence(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scores -> presence, piecewise linear: 0 -> 0, threshold -> 0.5, 1 -> 1."""
    low = scores / (2 * threshold)
    high = 0.5 + (scores - threshold) / (2 * (1 - threshold))
    return torch.where(scores >= threshold, high.clamp(min=0.5 + 1e-4), low.clamp(max=0.5 - 1e-4))
