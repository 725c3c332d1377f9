"""The LightningModule: a swappable backbone feeding ``max_len`` parallel digit heads."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.ops import roi_align

from svhn.labels import BLANK, DEFAULT_MAX_LEN, NUM_CLASSES, canonical_predictions
from svhn.models import create_backbone
from svhn.transforms import IMAGENET_MEAN, IMAGENET_STD, ZOOM_CROP_MARGIN

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle", "step")


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


class SequenceMetrics(nn.Module):
    """seq_acc (whole string right, as the competition scores it), char_acc, per position."""

    def __init__(self, max_len: int):
        super().__init__()
        self.seq_acc = MeanMetric()
        self.char_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.pos_acc = nn.ModuleList(
            MulticlassAccuracy(NUM_CLASSES, average="micro") for _ in range(max_len))

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        probs = logits.float().softmax(-1)
        predicted = canonical_predictions(probs)
        self.seq_acc.update((predicted == targets).all(dim=1).float())
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


class DigitSequenceModel(L.LightningModule):
    """Reads a whole house number: backbone -> features -> max_len heads of 11 classes.

    Args:
        backbone: a classic name (simple_cnn, lenet5, alexnet, vgg, nin, googlenet) or any
            timm model name (resnet18, resnet50, ...).
        pretrained: ImageNet weights through timm (needs network).
        pretrained_weights: a local weights file for the timm backbone (the offline way).
        max_len: digit positions; must match the data module's.
        image_size: (height, width) the network reads; larger inputs (evaluation at
            ``eval_scale``) are resized for the first read, and zoom crops come from them.
        hidden_dim: optional shared hidden layer before the heads (0 = none).
        dropout: dropout before the heads.
        label_smoothing: cross-entropy label smoothing.
        feature_grid: pool the backbone's last feature maps to this (rows, cols) grid
            instead of its own pooling; keeps position for the box head. None = backbone's.
        box_head: also predict the box around the digits (normalised x0, y0, x1, y1).
        box_loss_weight: weight of the box loss (smooth L1) against the digit loss.
        zoom: with a box head, read again when evaluating: once on the whole image to find
            the digits, then on a crop around the predicted box (train with the ``zoom``
            augmentation so such crops are familiar).
        zoom_margin: the crop extends the predicted box by this fraction of its size on
            every side (default: the margin of the ``zoom`` augmentation's tight crops).
        zoom_steps: crop reads after the first: each later read crops around the box the
            previous crop predicted (the box is sharper when the digits fill the view).
        init_from: start from the weights of this checkpoint (fine-tuning), not a resume.
        optimizer: adam, adamw or sgd.
        lr, weight_decay, momentum: optimiser settings (momentum for sgd).
        scheduler: none, cosine (per step, to zero), onecycle, or step (x0.1 every
            step_epochs).
        step_epochs: epochs between decays for the step scheduler.
        channels_last: channels-last memory format (faster convolutions on GPUs and on CPUs
            with AMX under bf16).
        compile: run the backbone through torch.compile.
    """

    def __init__(
        self,
        backbone: str = "simple_cnn",
        pretrained: bool = False,
        pretrained_weights: str | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        image_size: tuple[int, int] = (64, 128),
        hidden_dim: int = 0,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        feature_grid: tuple[int, int] | None = None,
        box_head: bool = False,
        box_loss_weight: float = 1.0,
        zoom: bool = False,
        zoom_margin: float = ZOOM_CROP_MARGIN,
        zoom_steps: int = 1,
        init_from: str | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "none",
        step_epochs: int = 10,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}: choose one of {OPTIMIZERS}.")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r}: choose one of {SCHEDULERS}.")
        self.save_hyperparameters()
        if zoom and not box_head:
            raise ValueError("zoom needs box_head: true (the box says where to zoom).")
        if zoom_steps < 1:
            raise ValueError(f"zoom_steps must be at least 1, got {zoom_steps}.")
        self.backbone = create_backbone(backbone, pretrained, pretrained_weights, feature_grid)
        features = self.backbone.num_features
        self.heads = DigitHeads(features, max_len, hidden_dim, dropout)
        self.box_regressor = nn.Linear(features, 4) if box_head else None
        self.first_pass_seq_acc = MeanMetric() if zoom else None
        if init_from:
            self._load_weights(init_from)
        # ModuleDict keys cannot be "train" (an nn.Module attribute), hence the suffix.
        self.metrics = nn.ModuleDict(
            {f"{stage}_metrics": SequenceMetrics(max_len) for stage in ("train", "val", "test")})
        self._compiled_backbone = None

    @classmethod
    def load_for_inference(cls, checkpoint: str | Path, map_location: str | torch.device = "cpu",
                           channels_last: bool | None = None) -> DigitSequenceModel:
        """Load a checkpoint with its own settings; pretrained weights come from the file.
        ``channels_last`` overrides the memory format the model was trained with."""
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found.")
        model = cls.load_from_checkpoint(path, map_location=map_location, pretrained=False,
                                         pretrained_weights=None, compile=False,
                                         init_from=None)
        if channels_last is not None:
            model.hparams.channels_last = channels_last
        return model.apply_memory_format().eval()

    def apply_memory_format(self) -> DigitSequenceModel:
        """Weights in channels-last layout when ``channels_last`` is set (training, prediction
        and the benchmark all go through here)."""
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def _load_weights(self, checkpoint: str) -> None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: init_from checkpoint not found.")
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        own = self.state_dict()
        # Heads may differ (another max_len); load every tensor whose name and shape match.
        matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("backbone.") for k in matching):
            raise ValueError(f"{path}: no backbone weights match backbone "
                             f"{self.hparams.backbone!r}; was it trained with another one?")
        self.load_state_dict(matching, strict=False)

    # -- forward ------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.compile and self._compiled_backbone is None:
            # Kept out of the module tree so checkpoints keep plain parameter names.
            object.__setattr__(self, "_compiled_backbone", torch.compile(self.backbone))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled_backbone
        return (compiled if compiled is not None else self.backbone)(images)

    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass: ``logits`` (B, max_len, 11) and, with a box head, ``box`` (B, 4)."""
        features = self.features(images)
        out = {"logits": self.heads(features)}
        if self.box_regressor is not None:
            out["box"] = self.box_regressor(features).sigmoid()
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like ``read``; with ``zoom`` outside training, the logits come from the last of
        ``zoom_steps`` reads of crops around the predicted box, ``box`` is the last box
        predicted (in whole-image coordinates) and ``first_pass_logits`` keeps the first
        read's."""
        images = normalize_images(images)
        size = tuple(self.hparams.image_size)
        whole = images
        if tuple(images.shape[-2:]) != size:
            whole = F.interpolate(images, size=size, mode="bilinear", antialias=True,
                                  align_corners=False)
        out = self.read(whole)
        if not self.hparams.zoom or self.training:
            return out
        box, margin = out["box"].float(), self.hparams.zoom_margin
        for _ in range(self.hparams.zoom_steps):
            region = crop_region(box, margin)
            crop_out = self.read(crop_boxes(images, box, margin, size))
            box = box_from_crop(crop_out["box"].float(), region)
        return {"logits": crop_out["logits"], "box": box, "first_pass_logits": out["logits"]}

    def on_fit_start(self) -> None:
        self.apply_memory_format()

    # -- steps --------------------------------------------------------------------------
    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        out = self(batch["image"])
        logits, targets = out["logits"], batch["target"]
        loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES).float(), targets.reshape(-1),
                               label_smoothing=self.hparams.label_smoothing)
        batch_size = targets.shape[0]
        if "box" in out:
            box_loss = F.smooth_l1_loss(out["box"].float(), batch["box"], beta=0.05)
            self.log(f"{stage}/box_loss", box_loss, batch_size=batch_size, sync_dist=True,
                     on_step=False, on_epoch=True)
            loss = loss + self.hparams.box_loss_weight * box_loss
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), targets)
        if "first_pass_logits" in out:  # how much the zoom adds, in the same run
            first = canonical_predictions(out["first_pass_logits"].float().softmax(-1))
            self.first_pass_seq_acc.update((first == targets).all(dim=1).float())
            self.log(f"{stage}/first_pass_seq_acc", self.first_pass_seq_acc,
                     batch_size=batch_size, on_step=False, on_epoch=True)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=batch_size,
                 sync_dist=stage != "train")
        for name, metric in metrics.loggable(stage).items():
            self.log(name, metric, prog_bar=name.endswith("seq_acc"), batch_size=batch_size,
                     on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """File names, per-position probabilities (B, max_len, 11) and boxes if predicted."""
        out = self(batch["image"])
        result = {"file_name": list(batch["file_name"]),
                  "probs": out["logits"].float().softmax(-1)}
        if "box" in out:
            result["box"] = out["box"].float()
        return result

    # -- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                                        weight_decay=hp.weight_decay, nesterov=True)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.step_epochs, gamma=0.1)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.lr, total_steps=total_steps, pct_start=0.2)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 batches (as the data module sends them) -> ImageNet-normalised floats, on the
    model's device; float batches are taken as already normalised."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def crop_region(boxes: torch.Tensor, margin: float, min_size: float = 0.1) -> torch.Tensor:
    """The normalised region ``crop_boxes`` cuts: each box grown by ``margin`` of its size
    per side (at least ``min_size`` of the image), clipped to the image."""
    boxes = boxes.detach().float()
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=min_size) * (1 + 2 * margin)
    return torch.cat([centre - size / 2, centre + size / 2], dim=1).clamp(0, 1)


def box_from_crop(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Boxes predicted inside crops of ``regions`` -> normalised whole-image coordinates."""
    origin, extent = regions[:, :2], regions[:, 2:] - regions[:, :2]
    return torch.cat([origin + boxes[:, :2] * extent, origin + boxes[:, 2:] * extent], dim=1)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, margin: float,
               output_size: tuple[int, int], min_size: float = 0.1) -> torch.Tensor:
    """Crop each image around its normalised (x0, y0, x1, y1) box, grown by ``margin`` of
    its size per side, and resample the crop to ``output_size`` (bilinear)."""
    height, width = images.shape[-2:]
    corners = crop_region(boxes, margin, min_size)
    scale = torch.tensor([width, height, width, height], device=images.device)
    index = torch.arange(len(images), device=images.device, dtype=torch.float32)[:, None]
    rois = torch.cat([index, corners * scale], dim=1).to(images.dtype)
    return roi_align(images, rois, output_size=tuple(output_size), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


__all__ = ["BLANK", "DigitHeads", "DigitSequenceModel", "SequenceMetrics", "box_from_crop",
           "crop_boxes", "crop_region", "normalize_images"]
