"""Reading checkpoints: one place that opens them, upgrades older ones, and builds the reader.

A checkpoint written by ``svhn.fit`` holds the LightningModule's hyper-parameters, the data
module's (image size, cache and evaluation scale), the weights under ``reader.*`` and the
precision it was trained in. Checkpoints of earlier versions (weights at the top level,
``zoom: bool`` beside ``zoom_steps``, no precision) are upgraded when read, so they load and
predict as before.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from svhn.images import DEFAULT_IMAGE_SIZE
from svhn.labels import DEFAULT_MAX_LEN
from svhn.reader import DigitReader

FORMAT_VERSION = 2  # 1: before the reader had its own module (no "svhn_format" key)
READER_PREFIX = "reader."
LEGACY_READER_PARTS = ("backbone.", "heads.", "box_regressor.")
DEFAULT_PRECISION = "32-true"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or unlike the others)."""


@dataclass(frozen=True)
class CheckpointContents:
    """What a checkpoint says, with older formats already upgraded."""

    path: Path
    model: dict[str, Any]  # the LightningModule's hyper-parameters
    data: dict[str, Any]  # the data module's hyper-parameters (empty when not saved)
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    epoch: int | None = None
    global_step: int | None = None
    precision: str = DEFAULT_PRECISION  # what validation ran in
    training_state: bool = False  # optimiser and loop states: it can be resumed
    lr_schedulers: list = field(default_factory=list, repr=False)  # their saved states

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.data.get("image_size", self.model.get("image_size", DEFAULT_IMAGE_SIZE))
        return int(size[0]), int(size[1])

    @property
    def max_len(self) -> int:
        return int(self.model.get("max_len", self.data.get("max_len", DEFAULT_MAX_LEN)))


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Open a checkpoint file, upgraded to the current format; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a checkpoint (torch.load: {reason}). Pass a .ckpt "
                              "file that svhn.fit wrote, e.g. "
                              "runs/<name>/version_N/checkpoints/last.ckpt.") from None
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise CheckpointError(f"{path}: not a checkpoint of svhn.fit (no model weights in it). "
                              "Pass a .ckpt file that svhn.fit wrote.")
    return CheckpointContents(
        path=path,
        model=upgrade_hyperparameters(dict(raw.get("hyper_parameters") or {})),
        data=dict(raw.get("datamodule_hyper_parameters") or {}),
        state_dict=upgrade_state_dict(raw["state_dict"]),
        epoch=raw.get("epoch"),
        global_step=raw.get("global_step"),
        precision=raw.get("trainer_precision") or _precision_from_run_config(path),
        training_state=all(key in raw for key in ("optimizer_states", "loops")),
        lr_schedulers=list(raw.get("lr_schedulers") or []),
    )


def upgrade_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """Format 1 had ``zoom: bool`` and ``zoom_steps >= 1``; now ``zoom_steps`` alone
    (0 = no zoom)."""
    if "zoom" in hparams:
        zoom = hparams.pop("zoom")
        hparams["zoom_steps"] = int(hparams.get("zoom_steps", 1)) if zoom else 0
    return hparams


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1 kept the network's weights at the top level; now under ``reader.``."""
    return {(READER_PREFIX + key if key.startswith(LEGACY_READER_PARTS) else key): value
            for key, value in state.items()}


def _precision_from_run_config(path: Path) -> str:
    """Format-1 checkpoints did not record their precision; their run's config.yaml did."""
    config = path.parent.parent / "config.yaml"
    if path.parent.name != "checkpoints" or not config.is_file():
        return DEFAULT_PRECISION
    try:
        precision = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("precision")
    except yaml.YAMLError:
        return DEFAULT_PRECISION
    return str(precision) if precision else DEFAULT_PRECISION


def reader_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """The subset of the module's hyper-parameters that builds its ``DigitReader``."""
    names = inspect.signature(DigitReader).parameters
    return {key: value for key, value in hparams.items() if key in names}


def reader_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len(READER_PREFIX):]: value for key, value in state.items()
            if key.startswith(READER_PREFIX)}


def load_reader(checkpoint: str | Path | CheckpointContents,
                channels_last: bool | None = None, zoom_search: bool | None = None
                ) -> DigitReader:
    """The trained reader of a checkpoint, in eval mode on the CPU: no Lightning, no
    network (its pretrained weights are in the file). ``channels_last`` overrides the
    memory format it was trained with, ``zoom_search`` its search setting (None: as saved)."""
    contents = checkpoint if isinstance(checkpoint, CheckpointContents) else \
        read_checkpoint(checkpoint)
    arguments = reader_arguments(contents.model)
    arguments.update(pretrained=False, pretrained_weights=None)
    if channels_last is not None:
        arguments["channels_last"] = channels_last
    if zoom_search is not None:
        if zoom_search and not arguments.get("zoom_steps"):
            raise CheckpointError(f"{contents.path}: zoom search needs a reader that zooms "
                                  "(trained with box_head and zoom_steps > 0, e.g. "
                                  "configs/real_cpu.yaml); drop --zoom_search for this one.")
        arguments["zoom_search"] = zoom_search
    reader = DigitReader(**arguments)
    try:
        reader.load_state_dict(reader_weights(contents.state_dict))
    except RuntimeError as err:
        raise CheckpointError(f"{contents.path}: its weights do not fit the model its settings "
                              f"describe ({str(err).splitlines()[0]}).") from None
    return reader.apply_memory_format().eval()
