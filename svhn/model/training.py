"""The LightningModule that trains a ``DigitReader``: loss, metrics, optimiser, schedule.

The network itself (backbone, per-character heads, box head, zoom reads) is
``svhn.model.reader.DigitReader``, a plain ``nn.Module``; this class only trains it. Its flat
arguments are the ``--model.*`` flags of ``svhn.fit``: the reader's settings are passed on
to the reader, the rest are training settings.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from svhn.checkpoint_format import (
    FORMAT_VERSION,
    CheckpointError,
    plain_settings,
    read_checkpoint,
    reader_weights,
    upgrade_hyperparameters,
    upgrade_state_dict,
    weights_mismatch,
)
from svhn.data.labels import BLANK, NUM_CLASSES
from svhn.errors import SettingError, at_least
from svhn.model.detector import detection_loss
from svhn.model.metrics import SequenceMetrics, whole_string_correct
from svhn.model.reader import DigitReader

OPTIMIZERS = ("adam", "adamw", "sgd")
# init_from refuses a start with less of the backbone than this: a checkpoint of another
# width or backbone shares names but hardly a shape, and training from scratch while the
# user believes they fine-tune is the silent failure this guards against.
MIN_BACKBONE_SHARE = 0.5
SCHEDULERS = ("none", "cosine", "onecycle", "step")
STAGES = ("train", "val", "test")


class DigitSequenceModel(L.LightningModule):
    """Trains a ``DigitReader``; ``reader_args`` are its arguments (backbone, pretrained,
    pretrained_weights, timm_args, max_len, image_size, hidden_dim, dropout, feature_grid,
    box_head, char_boxes, zoom_from, zoom_steps, zoom_margin, zoom_search, channels_last,
    search_gate, search_majority, search_merge, head, detect_threshold, detector_width: see
    ``svhn.model.reader.DigitReader``).

    Training args:
        label_smoothing: cross-entropy label smoothing.
        box_loss_weight: weight of the box loss (smooth L1) against the digit loss.
        char_box_loss_weight: weight of the per-digit box loss (smooth L1 over the positions
            that hold a digit; readers with ``char_boxes``); with ``head: detector``, the
            weight of its digit boxes' generalised IoU loss.
        init_from: start from the weights of this checkpoint (fine-tuning), not a resume.
        optimizer: adam, adamw or sgd.
        lr, weight_decay, momentum: optimiser settings (momentum for sgd).
        scheduler: none, cosine (per step, to zero), onecycle, or step (x0.1 every
            step_epochs).
        step_epochs: epochs between decays for the step scheduler.
        compile: run the backbone through torch.compile.
        zoom: replaced by ``zoom_steps``; still read (with a warning) so older configs and
            checkpoints keep their meaning.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        box_loss_weight: float = 1.0,
        char_box_loss_weight: float = 1.0,
        init_from: str | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "none",
        step_epochs: int = 10,
        compile: bool = False,
        zoom: bool | None = None,
        **reader_args: Any,
    ):
        super().__init__()
        if zoom is not None:
            # Format-1 settings (old configs, and the hyper-parameters LightningCLI reads back
            # from an older checkpoint): mapped as they were meant, with a word on the new knob.
            warnings.warn("model.zoom is replaced by model.zoom_steps (0 = no zoom; 3 in "
                          "configs/zoom.yaml): drop zoom and set zoom_steps.", stacklevel=2)
            reader_args = upgrade_hyperparameters({**reader_args, "zoom": zoom})
        if optimizer not in OPTIMIZERS:
            raise SettingError(f"optimizer {optimizer!r}: choose one of {OPTIMIZERS}.")
        if scheduler not in SCHEDULERS:
            raise SettingError(f"scheduler {scheduler!r}: choose one of {SCHEDULERS}.")
        at_least("model.lr", lr, 0)
        at_least("model.weight_decay", weight_decay, 0)
        at_least("model.momentum", momentum, 0)
        at_least("model.step_epochs", step_epochs, 1)
        at_least("model.box_loss_weight", box_loss_weight, 0)
        at_least("model.char_box_loss_weight", char_box_loss_weight, 0)
        if not 0 <= label_smoothing < 1:
            raise SettingError(f"model.label_smoothing {label_smoothing!r}: must be in [0, 1).")
        self.save_hyperparameters(ignore=["zoom"])
        self.hparams.update(reader_args)  # zoom_steps as mapped above
        # The reader's own settings (--model.backbone, --model.zoom_steps, ...): LightningCLI
        # reads them from DigitReader's signature, so they are written down once.
        self.reader = DigitReader(**reader_args)
        if init_from:
            self._start_from(init_from)
        # ModuleDict keys cannot be "train" (an nn.Module attribute), hence the suffix.
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_metrics": SequenceMetrics(self.reader.max_len)
             for stage in STAGES})
        self.first_pass_seq_acc = (MeanMetric(nan_strategy="disable")
                                   if self.reader.zoom_steps else None)

    def _start_from(self, checkpoint: str) -> None:
        """Fine-tuning: every reader tensor whose name and shape match (heads may differ,
        e.g. another max_len); the backbone must match, and the user is told how much
        loaded. Shares count weights, not tensors: a BatchNorm's 0-d step counter matches
        any backbone and must not pass for a loaded one."""
        contents = read_checkpoint(checkpoint)
        own = self.reader.state_dict()
        theirs = reader_weights(contents.state_dict)
        matching = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
        backbone = {k: v for k, v in own.items() if k.startswith("backbone.")}
        total = sum(v.numel() for v in backbone.values())
        loaded = sum(v.numel() for k, v in matching.items() if k in backbone)
        if total and loaded < MIN_BACKBONE_SHARE * total:
            name = self.hparams.get("backbone", "the default backbone")
            raise CheckpointError(
                f"{checkpoint}: only {loaded:,} of {total:,} backbone weights of {name!r} "
                f"match it (first difference: {weights_mismatch(backbone, theirs)}); was it "
                "trained with another backbone or other --model.timm_args? Use the settings "
                "it was trained with (its run's config.yaml).")
        self.reader.load_state_dict(matching, strict=False)
        weights = sum(v.numel() for v in own.values())
        share = sum(v.numel() for v in matching.values()) / max(1, weights)
        rest = "" if share == 1 else (
            f"; the rest start fresh (first difference: {weights_mismatch(own, theirs)})")
        rank_zero_info(f"init_from {checkpoint}: {share:.1%} of the reader's weights loaded "
                       f"({loaded:,} of {total:,} in the backbone){rest}.")

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["svhn_format"] = FORMAT_VERSION
        # Settings as plain values (a Path given from Python as str, numpy scalars as
        # numbers): the file then opens with torch.load(weights_only=True) alone.
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain_settings(dict(checkpoint[key]))
        if self._trainer is not None:
            # Prediction runs in the precision validation ran in, unless told otherwise.
            checkpoint["trainer_precision"] = str(self.trainer.precision)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming or validating a format-1 checkpoint: its weights move under reader."""
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])

    # -- forward --------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.compile:
            self.reader.compile_backbone()

    def on_fit_start(self) -> None:
        self.reader.apply_memory_format()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.reader(images)

    # -- steps ----------------------------------------------------------------------------
    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        # One zoom chain in validation: the search (zoom_search) would cost 29x; svhn.predict
        # runs it.
        out = self.reader(batch["image"], search=False)
        logits, targets = out["logits"], batch["target"]
        batch_size = targets.shape[0]
        if "detection" in out:  # training the detector: its own loss, per cell
            parts = detection_loss(out["detection"], batch["char_boxes"], targets)
            for name, value in parts.items():
                self.log(f"{stage}/detect_{name}", value, batch_size=batch_size,
                         sync_dist=True, on_step=False, on_epoch=True)
            loss = parts["class_loss"] + self.hparams.char_box_loss_weight * parts["box_loss"]
        else:  # the heads' readings (the detector's too in evaluation: comparable losses)
            loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES).float(),
                                   targets.reshape(-1),
                                   label_smoothing=self.hparams.label_smoothing)
        if "box" in out:
            box_loss = F.smooth_l1_loss(out["box"].float(), batch["box"], beta=0.05)
            self.log(f"{stage}/box_loss", box_loss, batch_size=batch_size, sync_dist=True,
                     on_step=False, on_epoch=True)
            loss = loss + self.hparams.box_loss_weight * box_loss
        if "char_boxes" in out and self.reader.char_box_regressor is not None:
            char_box_loss = digit_box_loss(out["char_boxes"], batch["char_boxes"], targets)
            self.log(f"{stage}/char_box_loss", char_box_loss, batch_size=batch_size,
                     sync_dist=True, on_step=False, on_epoch=True)
            loss = loss + self.hparams.char_box_loss_weight * char_box_loss
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), targets)
        if "first_pass_logits" in out:  # how much the zoom adds, in the same run
            first_pass = out["first_pass_logits"].float().softmax(-1)
            self.first_pass_seq_acc.update(whole_string_correct(first_pass, targets))
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

    # -- optimisation ---------------------------------------------------------------------
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


def digit_box_loss(predicted: torch.Tensor, true: torch.Tensor, targets: torch.Tensor
                   ) -> torch.Tensor:
    """Smooth L1 between (B, max_len, 4) predicted and true digit boxes, over the positions
    that hold a digit whose box is known (blank, unlabelled and cropped-away positions add
    nothing); zero, still connected to the graph, when there is none."""
    known = (targets >= 0) & (targets != BLANK) & (true[..., 2] > true[..., 0])
    per_box = F.smooth_l1_loss(predicted.float(), true.float(), beta=0.05,
                               reduction="none").mean(-1)
    return (per_box * known).sum() / known.sum().clamp(min=1)


__all__ = ["DigitSequenceModel", "digit_box_loss"]
