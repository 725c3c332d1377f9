"""The trained reader of a checkpoint: its settings, with the caller's overrides, built and
loaded. Opening and upgrading the file is ``svhn.checkpoint_format``'s job."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from svhn.checkpoint_format import (
    CheckpointContents,
    CheckpointError,
    read_checkpoint,
    reader_weights,
    weights_mismatch,
)
from svhn.model.reader import DigitReader

__all__ = ["load_reader", "reader_arguments"]


def reader_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """The subset of the module's hyper-parameters that builds its ``DigitReader``."""
    names = inspect.signature(DigitReader).parameters
    return {key: value for key, value in hparams.items() if key in names}


def load_reader(checkpoint: str | Path | CheckpointContents, **overrides: Any) -> DigitReader:
    """The trained reader of a checkpoint, in eval mode on the CPU: no Lightning, no
    network (its pretrained weights are in the file).

    ``overrides`` replace the reader's saved settings by name (any ``DigitReader``
    argument: ``channels_last``, ``zoom_search``, ``search_gate`` (1: every image
    searched), ``search_majority``, ``search_merge``, ...); a None value keeps the saved
    one, as ``timm.create_model`` drops None keyword arguments. So a setting a command
    passes through is added once, where the command parses it."""
    contents = checkpoint if isinstance(checkpoint, CheckpointContents) else \
        read_checkpoint(checkpoint)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(overrides) - set(inspect.signature(DigitReader).parameters))
    if unknown:
        raise TypeError(f"load_reader: not a reader setting: {', '.join(unknown)}")
    arguments = reader_arguments(contents.model)
    if overrides.get("zoom_search") and not arguments.get("zoom_steps"):
        raise CheckpointError(f"{contents.path}: zoom search needs a reader that zooms "
                              "(trained with box_head and zoom_steps > 0, e.g. "
                              "configs/real_cpu.yaml); drop --zoom_search for this one.")
    arguments.update(overrides, pretrained=False, pretrained_weights=None)
    reader = DigitReader(**arguments)
    weights = reader_weights(contents.state_dict)
    try:
        reader.load_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(
            f"{contents.path}: its weights do not fit the model its settings describe "
            f"(first difference: {weights_mismatch(reader.state_dict(), weights)}); was the "
            "file changed, or written by another version of this project?") from None
    return reader.apply_memory_format().eval()
