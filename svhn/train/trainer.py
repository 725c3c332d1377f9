"""The Trainer behind ``svhn.fit``: Lightning's, taking ``precision: auto`` too."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
from lightning.fabric.connector import _PRECISION_INPUT  # what Lightning's Trainer takes
from lightning.pytorch.utilities import rank_zero_only

from svhn.precision import AUTO, auto_precision, emulated_bf16_notice

__all__ = ["rank_zero_print", "Trainer"]


class Trainer(pl.Trainer):
    """Lightning's ``Trainer``; ``precision: auto`` is resolved by
    ``svhn.precision.auto_precision`` and the choice is said once, with its reason; a bf16
    that this CPU would emulate is used as asked, and said."""

    def __init__(self, precision: _PRECISION_INPUT | Literal["auto"] | None = None,
                 **kwargs) -> None:
        accelerator = str(kwargs.get("accelerator", "auto"))
        if precision == AUTO:
            precision, why = auto_precision(accelerator)
            rank_zero_print(f"Precision: {precision} (auto: {why}).")
        elif precision is not None:
            notice = emulated_bf16_notice(str(precision), accelerator,
                                          fix="--trainer.precision auto (or 32-true) trains "
                                              "in float32.")
            if notice:
                rank_zero_print(notice)
        super().__init__(precision=precision, **kwargs)


@rank_zero_only
def rank_zero_print(message: str) -> None:
    """Print once, from the process of rank 0 (every rank builds a Trainer)."""
    print(message, flush=True)
