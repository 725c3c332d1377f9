"""The checkpoint format: one place that opens checkpoints and upgrades older ones.

A checkpoint written by ``svhn.fit`` holds the LightningModule's hyper-parameters, the data
module's (image size, cache and evaluation scale), the weights under ``reader.*`` and the
precision it was trained in. Checkpoints of earlier versions (weights at the top level,
``zoom: bool`` beside ``zoom_steps``, no precision) are upgraded when read, so they load and
predict as before.

A checkpoint is a pickle, and unpickling can run code. It is opened here with
``torch.load(weights_only=True)``: tensors, containers, numbers and strings, plus the few
types of ``SAFE_GLOBALS``. A file that holds anything else is refused (``CheckpointError``
naming the type) before any of it is built, and so is one whose hyper-parameters name an
instantiator or class other than LightningCLI's own (nothing here ever calls one).
"""

from __future__ import annotations

import pathlib
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from svhn.errors import SvhnError
from svhn.run_dir import RunDir

__all__ = ["CheckpointContents", "CheckpointError", "FORMAT_VERSION", "SAFE_GLOBALS",
           "check_lightning_keys", "load_weights_only", "plain_settings", "read_checkpoint",
           "reader_weights", "upgrade_hyperparameters", "upgrade_state_dict"]

FORMAT_VERSION = 2  # 1: before the reader had its own module (no "svhn_format" key)
READER_PREFIX = "reader."
LEGACY_READER_PARTS = ("backbone.", "heads.", "box_regressor.")
DEFAULT_PRECISION = "32-true"
# What a checkpoint that does not state its image size or digit positions was trained with:
# the defaults of the versions that did not record them (the data and model defaults today
# too, but these must not follow a later change of those).
UNRECORDED_IMAGE_SIZE = (64, 128)
UNRECORDED_MAX_LEN = 5
# Beyond torch's own weights-only types (tensors, dict, OrderedDict, list, tuple, set, str,
# numbers, None, torch.Size, dtypes, devices) the one kind a checkpoint of ours may hold: a
# path among the data module's settings when it was built from Python with a Path (svhn.fit
# saves them as str). Constructing one runs no code. Nothing broader is ever allowed.
SAFE_GLOBALS = (pathlib.PosixPath, pathlib.WindowsPath)
# What LightningCLI records in the hyper-parameters: ``_instantiator`` (Lightning before 2.6.6
# ran whatever it named, even with weights_only=True) and, in subclass mode, ``_class_path``.
# Only these values pass; they are dropped from what ``read_checkpoint`` returns.
LIGHTNING_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module",)
OWN_CLASS_PATHS = ("svhn.model.training.DigitSequenceModel",
                   "svhn.data.datamodule.SVHNDataModule",
                   # where they lived before the subpackages: older checkpoints still load
                   "svhn.module.DigitSequenceModel", "svhn.data.SVHNDataModule")


class CheckpointError(SvhnError, ValueError):
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
    # What the fit read (SVHNDataModule.training_data: data_dir, synthetic, ...); empty in
    # checkpoints written before it was recorded.
    trained_on: dict[str, Any] = field(default_factory=dict)
    # The epochs a time budget (svhn.train.time_budget) shortened the run's schedule to.
    budget_epochs: int | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.data.get("image_size", self.model.get("image_size", UNRECORDED_IMAGE_SIZE))
        return int(size[0]), int(size[1])

    @property
    def max_len(self) -> int:
        return int(self.model.get("max_len", self.data.get("max_len", UNRECORDED_MAX_LEN)))


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Open a checkpoint file, upgraded to the current format; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    raw = load_weights_only(path)
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise CheckpointError(f"{path}: not a checkpoint of svhn.fit (no model weights in it). "
                              "Pass a .ckpt file that svhn.fit wrote.")
    check_lightning_keys(path, raw)
    return CheckpointContents(
        path=path,
        model=upgrade_hyperparameters(_settings(raw.get("hyper_parameters"))),
        data=_settings(raw.get("datamodule_hyper_parameters")),
        state_dict=upgrade_state_dict(raw["state_dict"]),
        epoch=raw.get("epoch"),
        global_step=raw.get("global_step"),
        precision=raw.get("trainer_precision") or _precision_from_run_config(path),
        training_state=all(key in raw for key in ("optimizer_states", "loops")),
        lr_schedulers=list(raw.get("lr_schedulers") or []),
        trained_on=_recorded_training_data(raw),
        budget_epochs=_budget_epochs(raw),
    )


def _budget_epochs(raw: dict[str, Any]) -> int | None:
    """The planned epochs ``TimeBudget`` saved in the checkpoint's callback states."""
    callbacks = raw.get("callbacks")
    state = callbacks.get("TimeBudget") if isinstance(callbacks, dict) else None
    planned = state.get("planned_epochs") if isinstance(state, dict) else None
    return int(planned) if isinstance(planned, int) else None


def _recorded_training_data(raw: dict[str, Any]) -> dict[str, Any]:
    """``SVHNDataModule.state_dict()["trained_on"]`` as the fit saved it ({} if absent)."""
    state = raw.get("SVHNDataModule")
    recorded = state.get("trained_on") if isinstance(state, dict) else None
    return dict(recorded) if isinstance(recorded, dict) else {}


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with ``SAFE_GLOBALS`` allowed: what the file
    holds, or CheckpointError naming the types it was refused for (before any is built)."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        try:  # a static look at the pickle first: names every type at once, runs nothing
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a zip checkpoint (older torch.save format, or not one)
            unsafe = []
        if unsafe:
            raise _refused(path, unsafe)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = re.findall(r"GLOBAL (\S+)", str(err))
            if refused:  # torch names builtins without their module
                name = refused[0] if "." in refused[0] else f"builtins.{refused[0]}"
                raise _refused(path, [name]) from None
            reason = _first_line(err)
        except Exception as err:  # torch raises many types for a file that is not one
            reason = _first_line(err)
    raise CheckpointError(f"{path}: not a checkpoint (torch.load: {reason}). Pass a .ckpt "
                          "file that svhn.fit wrote, e.g. "
                          "runs/<name>/version_N/checkpoints/last.ckpt.")


def _refused(path: Path, types: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused, it holds {', '.join(types)}, not a tensor or plain value as in the "
        "checkpoints of svhn.fit, and opening it could run code; nothing of it was loaded.")


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError):  # torch's weights-only advice: the cause
        lines = [line for line in lines if "WeightsUnpickler error" not in line
                 and not line.startswith("Weights only load failed")] or lines
    return lines[0] if lines else type(err).__name__


def check_lightning_keys(path: Path, raw: dict[str, Any]) -> None:
    """CheckpointError when the hyper-parameters name an instantiator or class other than
    LightningCLI's own (what a loader such as ``load_from_checkpoint`` would call)."""
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        hparams = raw.get(key)
        if not isinstance(hparams, dict):
            continue
        instantiator = hparams.get("_instantiator")
        if instantiator is not None and instantiator not in LIGHTNING_INSTANTIATORS:
            raise CheckpointError(
                f"{path}: refused, its {key} name the instantiator {instantiator!r}; "
                f"svhn.fit records only {LIGHTNING_INSTANTIATORS[0]!r} (and nothing here "
                "calls one).")
        class_path = hparams.get("_class_path")
        if class_path is not None and class_path not in OWN_CLASS_PATHS:
            raise CheckpointError(
                f"{path}: refused, its {key} name the class {class_path!r}, not one of "
                f"svhn's ({', '.join(OWN_CLASS_PATHS)}).")


def _settings(hparams: Any) -> dict[str, Any]:
    """Saved hyper-parameters as a plain dict, without LightningCLI's bookkeeping keys."""
    return {key: value for key, value in dict(hparams or {}).items()
            if key not in ("_instantiator", "_class_path")}


def plain_settings(value: Any) -> Any:
    """``value`` with paths as str and numpy scalars as Python numbers, containers walked:
    what ``on_save_checkpoint`` stores, so a checkpoint needs nothing beyond torch's
    weights-only types."""
    if isinstance(value, dict):
        return {key: plain_settings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_settings(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_settings(item) for item in value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, np.generic):  # a numpy scalar
        return value.item()
    return value


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
    run = RunDir.of_checkpoint(path)
    if run is None or not run.config.is_file():
        return DEFAULT_PRECISION
    try:
        precision = (yaml.safe_load(run.config.read_text()) or {}).get("trainer", {}).get(
            "precision")
    except yaml.YAMLError:
        return DEFAULT_PRECISION
    return str(precision) if precision else DEFAULT_PRECISION


def reader_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len(READER_PREFIX):]: value for key, value in state.items()
            if key.startswith(READER_PREFIX)}


def weights_mismatch(own: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str:
    """The first tensor in which a file's weights differ from a model's, in words: a shape
    (named, both shapes), a tensor the file lacks, or one the model has no place for."""
    for key, value in own.items():
        if key in theirs and theirs[key].shape != value.shape:
            return (f"{key}: {tuple(theirs[key].shape)} in the file, {tuple(value.shape)} in "
                    "the model")
    missing = [key for key in own if key not in theirs]
    if missing:
        return f"{missing[0]} (and {len(missing) - 1} more) not in the file"
    unexpected = [key for key in theirs if key not in own]
    if unexpected:
        return f"{unexpected[0]} (and {len(unexpected) - 1} more) in the file, not in the model"
    return "none"

