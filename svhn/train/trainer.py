"""The Trainer behind ``svhn.fit``: Lightning's, taking ``precision: auto`` too."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from svhn.precision import AUTO, auto_precision, emulated_bf16_notice

__all__ = ["Trainer"]

# Lightning's precision names (its Trainer's own annotation), and "auto"
_PrecisionInput = Literal[64, 32, 16, "transformer-engine", "transformer-engine-float16",
                          "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true",
                          "64-true", "64", "32", "16", "bf16", "auto"]


class Trainer(pl.Trainer):
    """Lightning's ``Trainer``; ``precision: auto`` is resolved by
    ``svhn.precision.auto_precision`` and the choice is said once, with its reason; a bf16
    that this CPU would emulate is used as asked, and said."""

    def __init__(self, precision: _PrecisionInput | None = None, **kwargs) -> None:
        accelerator = str(kwargs.get("accelerator", "auto"))
        if precision == AUTO:
            precision, why = auto_precision(accelerator)
            _say(f"Precision: {precision} (auto: {why}).")
        elif precision is not None:
            notice = emulated_bf16_notice(str(precision), accelerator,
                                          fix="--trainer.precision auto (or 32-true) trains "
                                              "in float32.")
            if notice:
                _say(notice)
        super().__init__(precision=precision, **kwargs)


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)
