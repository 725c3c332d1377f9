"""The reader: a plain ``nn.Module`` that reads a house number from an image batch.

``DigitReader(images) -> {"logits": (B, max_len, 11), ...}``: a backbone (``svhn.model.backbones``)
feeding ``max_len`` parallel per-character heads, and optionally a box head that predicts
where the digits are. With ``zoom_steps > 0`` it reads the whole image, then reads again
``zoom_steps`` times on a crop around the box it found, each crop cut around the box the
previous crop predicted (a zoom chain); the last crop's reading is the answer. With
``zoom_search`` it also starts chains from a fixed grid of windows, where its first two
chains are unsure (``search_gate``), and answers with the reading most chains agree on.
With ``head: detector`` each read's digits come from ``svhn.model.detector`` instead of
the parallel heads, in the same (B, max_len, 11) form. No Lightning here: training lives
in ``svhn.model.training``, prediction in ``svhn.inference``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from svhn.data.images import DEFAULT_IMAGE_SIZE
from svhn.data.labels import BLANK, DEFAULT_MAX_LEN, NUM_CLASSES
from svhn.data.transforms import ZOOM_CROP_MARGIN
from svhn.errors import SettingError, at_least
from svhn.geometry import box_from_crop, crop_boxes, crop_region, leader_boxes, paired_iou
from svhn.model.backbones import create_backbone, input_normalization
from svhn.model.detector import DETECTION_STRIDE, DetectionHead, decode_detections
from svhn.model.vote import chains_unsure, majority_share, voted_chain

__all__ = ["DigitHeads", "DigitReader", "FIRST_WINDOWS", "HEADS", "search_windows",
           "ZOOM_FROM"]

ZOOM_FROM = ("box", "digits")
HEADS = ("positions", "detector")
# The zoom search also runs where the first chain's confidence is below this (besides
# where the first two chains disagree): chosen on the real val sweep of docs/experiments.md.
SEARCH_GATE = 0.3
# Where ``zoom_search`` starts its extra chains: a 3x3 grid of window centres (normalised x,
# y) at three window sizes (width, height), 27 windows besides the two predicted boxes.
_SEARCH_CENTRES = ((0.25, 0.5, 0.75), (0.3, 0.5, 0.7))
_SEARCH_SIZES = ((0.7, 0.8), (0.5, 0.6), (0.3, 0.45))
# With ``search_majority``, the windows searched first: the middle size at every centre
# (indices into search_windows(), which is size by size).
FIRST_WINDOWS = tuple(range(len(_SEARCH_CENTRES[0]) * len(_SEARCH_CENTRES[1]),
                             2 * len(_SEARCH_CENTRES[0]) * len(_SEARCH_CENTRES[1])))
# What a zoom chain keeps of each read (not the detector's maps).
_CHAIN_KEYS = ("logits", "box", "char_boxes")
# The search's chains run side by side, their crops read together per zoom step, at most
# this many crops per read (to bound the memory): on a GPU, one chain at a time left the
# gated search slower than the full one (docs/performance.md). A CPU reads fewer at a time,
# across chains: very large reads were slower there, and the gated search's chains of a few
# unsure images would otherwise read in small batches.
SEARCH_CROPS_PER_READ = 2048
CPU_SEARCH_CROPS_PER_READ = 128


class DigitHeads(nn.Module):
    """``max_len`` independent classifiers over the same features -> (B, max_len, 11)."""

    def __init__(self, num_features: int, max_len: int, hidden_dim: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        if hidden_dim > 0:
            self.shared = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, hidden_dim),
                                        nn.ReLU(inplace=True))
            num_features = hidden_dim
        else:
            self.shared = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(num_features, NUM_CLASSES) for _ in range(max_len))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.shared(features))
        return torch.stack([head(hidden) for head in self.heads], dim=1)


class FeatureMaps(nn.Module):
    """The backbone's feature maps at ``levels`` (what the detector reads), as a module of
    its own so ``torch.compile`` can wrap them as it wraps a pooled backbone."""

    def __init__(self, backbone: nn.Module, levels: list[int]):
        super().__init__()
        self.backbone = backbone
        self.levels = levels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_intermediates(images, indices=self.levels,
                                                   intermediates_only=True)


class DigitReader(nn.Module):
    """Backbone -> features -> ``max_len`` heads of 11 classes (+ box head, + zoom reads).

    Args:
        backbone: a classic name (simple_cnn, lenet5, alexnet, vgg, nin, googlenet) or any
            timm model name (resnet18, resnet50, ...).
        pretrained: ImageNet weights through timm (needs network or the hub cache).
        pretrained_weights: a local weights file for the timm backbone (the offline way).
        timm_args: more arguments for ``timm.create_model``, e.g. ``{drop_path_rate: 0.1}``
            (stochastic depth) or ``{drop_rate: 0.2}``.
        max_len: digit positions.
        image_size: (height, width) the network reads; larger inputs (evaluation at the data
            module's ``eval_scale``) are resized for the first read and zoom crops come
            from them.
        hidden_dim: optional shared hidden layer before the heads (0 = none).
        dropout: dropout before the heads.
        feature_grid: pool the backbone's last feature maps to this (rows, cols) grid instead
            of its own pooling; keeps position for the box head. None = backbone's own.
        box_head: also predict the box around the digits (normalised x0, y0, x1, y1).
        char_boxes: also predict each position's own digit box (``char_boxes`` (B, max_len,
            4)), learnt from the per-digit boxes of the labels: the heads' positions are
            tied to places in the image.
        zoom_from: what each zoom crop is cut around: ``box`` (the box head's union box) or
            ``digits`` (the union of the char boxes at the positions the heads read as
            digits, so the crop holds as many digits as the reading has; needs
            ``char_boxes``; the box head's box where no digit is read).
        zoom_steps: crop reads after the whole-image read when not training (0 = none; needs
            the box head). Train with the ``zoom`` augmentation so such crops are familiar.
        zoom_margin: each crop grows the predicted box by this fraction of its size per side
            (default: the margin of the ``zoom`` augmentation's tight crops).
        zoom_search: when predicting, also start zoom chains from the box head's box and
            from ``search_windows()`` (29 chains in all, each ``zoom_steps`` reads) and
            answer with the reading most of them agree on in the same place, each chain's
            vote weighted by its reading's probability and by how much its box overlaps
            (``vote``). A number the first read missed (a small one in a wide scene, a
            door or lamp read instead) is still found by the chains that start near it.
            Costs 29x the crop reads; validation during ``svhn.fit`` reads one chain
            (``forward(search=False)``).
        channels_last: feed the convolutions channels-last (faster on GPUs, and on CPUs with
            AMX under bf16).
        search_gate: the zoom search's 27 window chains run only on the images where the
            first two chains disagree (reading or place) or the first chain's confidence
            (the product of its positions' top probabilities) is below this; 1 searches
            every image (``svhn.predict --full_search``).
        search_majority: spend the search in two steps: an unsure image first gets the 9
            middle-size windows' chains, and the other 18 only where the vote over its 11
            chains is split: its winning reading holds less than this share of their support
            (``majority_share``; 0.5: no majority). None: all 27 at once.
        search_merge: in the gated search, a crop nearly the same as one read already
            (this IoU) is not read again (``zoom_chains``): a chain whose next box overlaps
            the box it last read keeps its reading, and chains of one image whose boxes
            overlap at a zoom step go on as one, so windows that found the same number cost
            one chain. None: every chain reads its own crops. The full search
            (``search_gate`` 1) never merges: it is the reference.
        head: ``positions`` (the parallel per-character heads) or ``detector``: a dense
            digit detector over the backbone's stride-8/16/32 maps (``svhn.model.detector``)
            whose digits, sorted left to right, fill the positions; the same (B, max_len,
            11) reading, so the zoom, the vote and ensembles work unchanged. Needs a timm
            CNN backbone (its feature maps) and ``char_boxes: true`` (the digits' boxes it
            learns from and reports); ignores ``hidden_dim`` and ``dropout``.
        detect_threshold: with the detector, the score from which a detection is a digit.
        detector_width: the detector's channels (its lateral projections and its two 3x3
            convolutions at stride 8); it does not follow the backbone's width. On the
            half-width ResNet18-D of ``configs/real_cpu.yaml`` a 96-wide head holds the
            largest convolutions of the net, so a narrower one trains faster.
    """

    def __init__(
        self,
        backbone: str = "simple_cnn",
        pretrained: bool = False,
        pretrained_weights: str | None = None,
        timm_args: dict[str, Any] | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        feature_grid: tuple[int, int] | None = None,
        box_head: bool = False,
        char_boxes: bool = False,
        zoom_from: str = "box",
        zoom_steps: int = 0,
        zoom_margin: float = ZOOM_CROP_MARGIN,
        zoom_search: bool = False,
        channels_last: bool = False,
        search_gate: float = SEARCH_GATE,
        search_majority: float | None = None,
        search_merge: float | None = None,
        head: str = "positions",
        detect_threshold: float = 0.25,
        detector_width: int = 96,
    ):
        super().__init__()
        if zoom_steps < 0:
            raise SettingError(f"zoom_steps must be 0 (no zoom) or more, got {zoom_steps}.")
        if zoom_steps and not box_head:
            raise SettingError("zoom_steps > 0 needs box_head: true (the box says where to zoom); "
                             "configs/zoom.yaml sets both: --config configs/zoom.yaml.")
        if zoom_search and not zoom_steps:
            raise SettingError("zoom_search needs zoom_steps > 0 (it runs zoom chains from many "
                             "starting windows).")
        if zoom_from not in ZOOM_FROM:
            raise SettingError(f"zoom_from {zoom_from!r}: choose one of {ZOOM_FROM}.")
        if zoom_from == "digits" and not (char_boxes and box_head):
            raise SettingError("zoom_from: digits needs char_boxes: true and box_head: true "
                             "(the digits' boxes say where to zoom, the box head where "
                             "no digit is read).")
        if head not in HEADS:
            raise SettingError(f"head {head!r}: choose one of {HEADS}.")
        if head == "detector" and not char_boxes:
            raise SettingError("head: detector needs char_boxes: true (it learns from the "
                               "digits' boxes and reports them).")
        if not 0 <= search_gate <= 1:
            raise SettingError(f"search_gate {search_gate!r}: must be in [0, 1] (1 searches "
                               "every image).")
        if search_majority is not None and not 0 < search_majority <= 1:
            raise SettingError(f"search_majority {search_majority!r}: must be in (0, 1] "
                               "(or null: every window at once).")
        if search_merge is not None and not 0 < search_merge <= 1:
            raise SettingError(f"search_merge {search_merge!r}: must be in (0, 1] (an IoU; "
                               "or null: no chains merged).")
        if not 0 < detect_threshold < 1:
            raise SettingError(f"detect_threshold {detect_threshold!r}: must be in (0, 1).")
        at_least("detector_width", detector_width, 1)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_len = max_len
        self.detect_threshold = detect_threshold
        self.zoom_from = zoom_from
        self.zoom_steps = zoom_steps
        self.zoom_margin = zoom_margin
        self.zoom_search = zoom_search
        self.search_gate = search_gate
        self.search_majority = search_majority
        self.search_merge = search_merge
        # Crops per read of the search (None: SEARCH_CROPS_PER_READ on an accelerator,
        # CPU_SEARCH_CROPS_PER_READ on a CPU; 0: each zoom step's crops in one read, with no
        # loop over the batch's size, which an ONNX export needs to keep its batch free);
        # not a hyper-parameter: it changes the speed, not the answer.
        self.search_crops_per_read: int | None = None
        self.channels_last = channels_last
        self.detector: DetectionHead | None = None
        if head == "detector":
            # The maps themselves, not pooled: the detector reads them; the box head reads
            # the last one pooled to feature_grid.
            self.backbone = create_backbone(backbone, pretrained, pretrained_weights, None,
                                            timm_args)
            self.detect_levels, channels = _detection_levels(self.backbone, backbone)
            self.detector = DetectionHead(channels, detector_width)
            self.box_pool = nn.AdaptiveAvgPool2d(tuple(feature_grid or (1, 1)))
            features = channels[-1] * self.box_pool.output_size[0] * self.box_pool.output_size[1]
        else:
            self.backbone = create_backbone(backbone, pretrained, pretrained_weights,
                                            feature_grid, timm_args)
            features = self.backbone.num_features
        self.heads = None
        self.char_box_regressor = None
        if head == "positions":
            self.heads = DigitHeads(features, max_len, hidden_dim, dropout)
            if char_boxes:
                self.char_box_regressor = nn.Linear(features, max_len * 4)
        self.box_regressor = nn.Linear(features, 4) if box_head else None
        mean, std = input_normalization(self.backbone)
        # Not saved: they follow from the backbone, and older checkpoints do not have them.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255,
                             persistent=False)
        # On the reader's device: no host-to-device copy per searched batch.
        self.register_buffer("search_starts", search_windows(), persistent=False)
        # What each read runs the images through: the pooled backbone, or with the detector
        # its feature maps. Built once, and kept out of the module tree (as its compiled
        # form) so the weights keep their plain names in checkpoints.
        object.__setattr__(self, "feature_extractor", self.backbone if self.detector is None
                           else FeatureMaps(self.backbone, self.detect_levels))
        self.compiled_backbone: nn.Module | None = None
        self.apply_memory_format()

    def apply_memory_format(self) -> DigitReader:
        """Weights in channels-last layout when ``channels_last`` is set."""
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def compile_backbone(self) -> None:
        """Run the backbone through ``torch.compile`` (with the detector: its feature maps);
        kept out of the module tree so the weights keep their plain names in checkpoints."""
        if self.compiled_backbone is None:
            object.__setattr__(self, "compiled_backbone", torch.compile(self.feature_extractor))

    def features(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``feature_extractor`` on images, compiled once ``compile_backbone`` ran."""
        # "or" would ask the compiled module for its len(), which it refuses
        extractor = self.feature_extractor if self.compiled_backbone is None else \
            self.compiled_backbone
        return extractor(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batches (as the data module sends them) -> floats normalised for this
        backbone, on the reader's device; float batches are taken as already normalised."""
        if images.dtype != torch.uint8:
            return images
        return (images.float() - self.pixel_mean) / self.pixel_std

    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass over normalised images at ``image_size``: ``logits`` (B, max_len, 11)
        and, with a box head, ``box`` (B, 4)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.detector is not None:
            return self.detect(images)
        features = self.features(images)
        out = {"logits": self.heads(features)}
        if self.box_regressor is not None:
            out["box"] = self.box_regressor(features).sigmoid()
        if self.char_box_regressor is not None:
            chars = self.char_box_regressor(features).sigmoid()
            out["char_boxes"] = chars.view(len(chars), -1, 4)
        return out

    def detect(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``read`` with the detector: ``detection`` (the head's maps, for the loss), the
        decoded ``logits`` (log-probabilities) and ``char_boxes``, and the ``box``."""
        maps = self.features(images)
        detection = self.detector(maps)
        with torch.no_grad():  # decoding picks cells: nothing to learn through it
            found = decode_detections(detection, self.max_len, self.detect_threshold)
        out = {"logits": found["probs"].clamp(min=1e-6).log(),
               "char_boxes": found["char_boxes"], "detection": detection}
        if self.box_regressor is not None:
            pooled = torch.flatten(self.box_pool(maps[-1]), 1)
            out["box"] = self.box_regressor(pooled).sigmoid()
        return out

    def zoom_box(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The box the next crop is cut around (see ``zoom_from``), in the coordinates of
        the read that produced ``out``."""
        box = out["box"].float()
        if self.zoom_from == "box":
            return box
        chars = out["char_boxes"].float()
        is_digit = (out["logits"].argmax(-1) != BLANK)[..., None]
        low = torch.where(is_digit, chars[..., :2], torch.inf).amin(1)
        high = torch.where(is_digit, chars[..., 2:], -torch.inf).amax(1)
        digits = torch.cat([low, high], 1)
        return torch.where(is_digit.any(1), digits, box)

    def zoom_chain(self, images: torch.Tensor, box: torch.Tensor) -> dict[str, torch.Tensor]:
        """``zoom_steps`` crop reads of normalised full-size ``images``, the first cut around
        ``box``, each next one around the box the last read found: the last read's
        ``logits``, its ``box`` and ``char_boxes`` in whole-image coordinates."""
        return self.zoom_chains(images, [box])[0]

    def zoom_chains(self, images: torch.Tensor, starts: list[torch.Tensor],
                    merge_iou: float | None = None) -> list[dict[str, torch.Tensor]]:
        """A zoom chain on ``images`` from each of ``starts`` ((B, 4) boxes), as
        ``zoom_chain`` would give them one by one, run side by side: each zoom step reads
        the chains' crops in reads of up to ``search_crops_per_read`` crops. With
        ``merge_iou``, a crop nearly the same as one read already is not read again: a
        chain whose next box overlaps the box it last read by that IoU has settled (it
        keeps its last reading), and one whose next box overlaps an earlier chain's of the
        same image at this step (``leader_boxes``) takes that chain's reading."""
        batch, count = len(images), len(starts)
        per_read = self.search_crops_per_read
        if per_read is None:
            per_read = CPU_SEARCH_CROPS_PER_READ if images.device.type == "cpu" \
                else SEARCH_CROPS_PER_READ
        box = torch.cat([start.float() for start in starts])  # (count * batch, 4)
        rows = torch.arange(batch, device=images.device).repeat(count)
        last: dict[str, torch.Tensor] = {}  # each chain's last reading (whole-image boxes)
        last_read = None  # the box each chain's last crop was cut around
        for _ in range(self.zoom_steps):
            readers, follows, settled = None, None, None
            if merge_iou is not None:  # a host sync per step: how many crops to read
                if last_read is not None:
                    settled = paired_iou(box, last_read) >= merge_iou
                readers, follows = leader_boxes(
                    box.view(count, batch, 4), merge_iou,
                    None if settled is None else settled.view(count, batch))
            if readers is not None and not len(readers):
                break  # every chain has settled
            found = self._read_crops(images, box, rows, readers, per_read)
            if follows is not None:  # every chain again, each with its leader's reading
                found = {key: value[follows] for key, value in found.items()}
            if settled is not None:
                found = {key: torch.where(settled.view(-1, *[1] * (value.ndim - 1)),
                                          last[key].to(value.dtype), value)
                         for key, value in found.items()}
            last, last_read, box = found, box, found["box"]
        parts = {key: value.unflatten(0, (count, batch)).unbind(0) for key, value in last.items()}
        return [{key: value[i] for key, value in parts.items()} for i in range(count)]

    def _read_crops(self, images: torch.Tensor, box: torch.Tensor, rows: torch.Tensor,
                    readers: torch.Tensor | None, per_read: int) -> dict[str, torch.Tensor]:
        """One zoom step: the crops around ``box`` (of images ``rows``; only at ``readers``
        when given) read ``per_read`` at a time (0: all in one read): ``logits``, the ``box``
        found and ``char_boxes``, in whole-image coordinates."""
        if readers is not None:
            box, rows = box[readers], rows[readers]
        region = crop_region(box, self.zoom_margin)
        parts = [slice(None)] if per_read == 0 else \
            [slice(first, first + per_read) for first in range(0, len(box), per_read)]
        reads = [self.read(crop_boxes(images, box[part], self.zoom_margin, self.image_size,
                                      image_rows=rows[part])) for part in parts]
        out = {key: torch.cat([read[key] for read in reads]) for key in _CHAIN_KEYS
               if key in reads[0]}
        found = {"logits": out["logits"], "box": box_from_crop(self.zoom_box(out), region)}
        if "char_boxes" in out:
            found["char_boxes"] = box_from_crop(out["char_boxes"].float(), region)
        return found

    def search(self, images: torch.Tensor, out: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """The zoom search, spent where it is unsure: a first chain from the digits read
        (``zoom_box``) and a second from the box head's box for every image, then 27 more
        chains from ``search_windows()`` and the vote (``voted_chain``) over all 29 only on
        the images ``unsure`` picks (every image when ``search_gate`` is 1: the full
        search). ``searched`` (B,) says which."""
        starts = [self.zoom_box(out), out["box"].float()]
        if self.search_gate >= 1:  # the full search: no gate, no host sync, one batch
            result = voted_chain(self.zoom_chains(images, starts + self.window_starts(
                len(images))))
            result["searched"] = torch.ones(len(images), dtype=torch.bool,
                                            device=images.device)
            return result
        first, second = self.zoom_chains(images, starts, self.search_merge)
        # The gate's host sync: how many images to search decides the work (the two-step
        # search has one more, for how many go on).
        rows = self.unsure(first, second).nonzero().squeeze(1)
        # An image not searched: its two chains, then its answer in the windows' places
        # (the search would have agreed: what the gate assumes), so ensembles still vote
        # over 29 chains per member.
        result = _with_chains(voted_chain([first, second]), [first, second],
                              [None] * len(self.search_starts))
        if len(rows):  # (its length is known here: nonzero synced already)
            chains = [_take(first, rows), _take(second, rows)]
            if self.search_majority is None:
                voted = voted_chain(chains + self.window_chains(images[rows]))
            else:
                voted = self.search_in_two_steps(images[rows], chains)
            result = _put_rows(result, rows, voted)
        result["searched"] = torch.zeros(len(images), dtype=torch.bool,
                                         device=images.device).index_fill(0, rows, True)
        return result

    def search_in_two_steps(self, images: torch.Tensor, chains: list[dict[str, torch.Tensor]]
                            ) -> dict[str, torch.Tensor]:
        """``search_majority``'s search of ``images`` given their first two ``chains``: the
        middle-size windows first, the rest only where the vote over those is split. As
        ``voted_chain`` over 29 chains; a window not run holds the answer (the gate's fill)."""
        first_windows = dict(zip(FIRST_WINDOWS,
                                 self.window_chains(images, FIRST_WINDOWS), strict=True))
        voted = voted_chain(chains + list(first_windows.values()))
        split = majority_share(voted["chain_logits"].float().softmax(-1),
                               voted["chain_boxes"]) < self.search_majority
        result = _with_chains(voted, chains, [first_windows.get(index) for index
                                              in range(len(self.search_starts))])
        rows = split.nonzero().squeeze(1)  # the second host sync: how many go on
        if len(rows):
            rest = [index for index in range(len(self.search_starts))
                    if index not in first_windows]
            more = dict(zip(rest, self.window_chains(images[rows], rest), strict=True))
            windows = [more[index] if index in more else _take(first_windows[index], rows)
                       for index in range(len(self.search_starts))]
            result = _put_rows(result, rows, voted_chain(
                [_take(chain, rows) for chain in chains] + windows))
        return result

    def window_chains(self, images: torch.Tensor, windows: Sequence[int] | None = None
                      ) -> list[dict[str, torch.Tensor]]:
        """A zoom chain from each of ``search_starts`` (the buffer of ``search_windows()``),
        or from those at ``windows`` (indices); chains merged at ``search_merge``."""
        return self.zoom_chains(images, self.window_starts(len(images), windows),
                                self.search_merge)

    def window_starts(self, batch: int, windows: Sequence[int] | None = None
                      ) -> list[torch.Tensor]:
        """The (batch, 4) start of each of the search's windows (all, or those at
        ``windows``)."""
        starts = self.search_starts if windows is None else \
            [self.search_starts[index] for index in windows]  # no index tensor to copy over
        return [window.expand(batch, 4) for window in starts]

    def unsure(self, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
               ) -> torch.Tensor:
        """(B,) the images worth the search (``chains_unsure`` of the first two chains,
        from the digits read and from the box head's box, at ``search_gate``)."""
        return chains_unsure(first["logits"].float().softmax(-1),
                             second["logits"].float().softmax(-1), first["box"], second["box"],
                             self.search_gate)

    def forward(self, images: torch.Tensor, search: bool | None = None
                ) -> dict[str, torch.Tensor]:
        """Like ``read`` on the whole image; with ``zoom_steps`` outside training, the logits
        come from the last crop read of a zoom chain (the one ``vote`` picks when
        ``search``, default ``zoom_search``, runs many), ``box`` and ``char_boxes`` are its
        last ones (whole-image coordinates) and ``first_pass_logits`` keeps the whole-image
        read's; a search also returns every chain's ``chain_logits`` and ``chain_boxes``
        (``voted_chain``)."""
        images = self.normalize(images)
        whole = images
        if tuple(images.shape[-2:]) != self.image_size:
            whole = F.interpolate(images, size=self.image_size, mode="bilinear",
                                  antialias=True, align_corners=False)
        out = self.read(whole)
        if not self.zoom_steps or self.training:
            return out
        if self.zoom_search if search is None else search:
            result = self.search(images, out)
        else:
            result = self.zoom_chain(images, self.zoom_box(out))
        result["first_pass_logits"] = out["logits"]
        return result


def _detection_levels(model: nn.Module, name: str) -> tuple[list[int], list[int]]:
    """The indices and channels of a timm model's feature maps at stride 8 and coarser."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not hasattr(model, "forward_intermediates"):
        raise SettingError(f"head: detector needs a timm CNN backbone that gives its feature "
                           f"maps (resnet18d, resnet50, ...); {name!r} does not.")
    levels = [i for i, level in enumerate(info) if level["reduction"] >= DETECTION_STRIDE]
    if not levels or info[levels[0]]["reduction"] != DETECTION_STRIDE:
        raise SettingError(f"head: detector needs a stride-{DETECTION_STRIDE} feature map; "
                           f"backbone {name!r} has strides "
                           f"{[level['reduction'] for level in info]}.")
    return levels, [info[i]["num_chs"] for i in levels]


def _take(chain: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in chain.items()}


def _put_rows(result: dict[str, torch.Tensor], rows: torch.Tensor,
              part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``result`` with ``part``'s values (one row per index of ``rows``) written at rows."""
    return {key: value.index_put((rows,), part[key].to(value.dtype))
            for key, value in result.items()}


def _with_chains(voted: dict[str, torch.Tensor], chains: list[dict[str, torch.Tensor]],
                 windows: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """``voted``'s answer with its 29 ``chain_logits`` and ``chain_boxes`` (and
    ``chain_char_boxes``, when the reader finds each digit's box) in the search's
    order: ``chains`` (the first two), then the windows', the answer itself in the place
    of a window not run (None)."""
    result = {key: value for key, value in voted.items() if key in chains[0]}
    ordered = chains + [result if window is None else window for window in windows]
    result["chain_logits"] = torch.stack(
        [chain["logits"].to(result["logits"].dtype) for chain in ordered], 1)
    result["chain_boxes"] = torch.stack([chain["box"].float() for chain in ordered], 1)
    if "char_boxes" in result:
        result["chain_char_boxes"] = torch.stack([chain["char_boxes"].float()
                                                  for chain in ordered], 1)
    return result


def search_windows() -> torch.Tensor:
    """The (27, 4) normalised windows ``zoom_search`` starts chains from, clipped to the
    image: every size of _SEARCH_SIZES at every centre of the _SEARCH_CENTRES grid. A new
    tensor each call (the reader keeps its own as a buffer, so it sits on its device)."""
    return torch.tensor(_search_window_values())


@functools.cache  # a constant: computed once, as numbers (a cached tensor could be fake)
def _search_window_values() -> tuple[tuple[float, float, float, float], ...]:
    xs, ys = _SEARCH_CENTRES
    return tuple(tuple(min(max(v, 0.0), 1.0) for v in (x - w / 2, y - h / 2, x + w / 2,
                                                        y + h / 2))
                 for w, h in _SEARCH_SIZES for x in xs for y in ys)
