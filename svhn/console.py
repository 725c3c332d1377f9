"""What the commands print: framed notices, and the one filter of libraries' harmless chatter."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

__all__ = ["DataWarning", "HARMLESS_INFO", "HARMLESS_WARNINGS", "framed", "quiet_libraries"]


class DataWarning(UserWarning):
    """Something in the user's data that a command works around (boxes clipped to their
    image, images without a label): said once per command, as ``warning: ...`` alone,
    without the line of our source that Python's warnings print."""

# Warnings from Lightning and torch that say nothing about this project's runs.
HARMLESS_WARNINGS = (
    r".*does not have many workers.*",  # 0 workers is the choice on <= 2 cores
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning internals, torch 2.9+
    r".*LeafSpec.*",
    r"Precision .* is not supported by the model summary.*",
    r"LightningCLI's args parameter.*",  # from Python (tests, notebooks) argv is not ours
    r"Checkpoint directory .* exists and is not empty.*",  # a resumed run, in its own folder
    r".*GPU available but not used.*",
    # svhn.fit validate/test of another run's checkpoint: that run's checkpoint callback
    # state is read and nothing is saved, so where it saved before does not matter.
    r"The dirpath has changed from .*",
    # configs/ema.yaml: configure_model only compiles the backbone (--model.compile); the
    # model is never sharded, so the averaged copy fits as the model does.
    r"You're using the WeightAveraging callback with a model that overrides the "
    r"configure_model.*",
)
# Lightning's info lines that advertise or explain nothing a user asked about.
HARMLESS_INFO = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches",
                 # Devices a run has not got: the precision line already says what it runs on.
                 "GPU available: False", "TPU available: False", "HPU available: False")


def framed(lines: Sequence[str]) -> str:
    """Lines between two rules of ``=``, so a message stands out among the training logs
    (no right border: a long command stays copyable)."""
    rule = "=" * min(max(len(line) for line in lines) + 2, 88)
    return "\n".join([rule, *(f" {line}" for line in lines), rule])


def _data_warnings_plainly(format_warning):
    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, DataWarning):
            return f"warning: {message}\n"
        return format_warning(message, category, filename, lineno, line)
    return formatwarning


class _DropHarmlessInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(HARMLESS_INFO)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide ``HARMLESS_WARNINGS`` and ``HARMLESS_INFO`` while a command runs (every command
    runs inside it: ``svhn.errors.command``)."""
    hints = _DropHarmlessInfo()
    loggers = [logging.getLogger(name) for name in
               ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    for logger in loggers:
        logger.addFilter(hints)
    try:
        with warnings.catch_warnings():
            for message in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            warnings.filterwarnings("once", category=DataWarning)
            original = warnings.formatwarning
            warnings.formatwarning = _data_warnings_plainly(original)
            try:
                yield
            finally:
                warnings.formatwarning = original
    finally:
        for logger in loggers:
            logger.removeFilter(hints)
