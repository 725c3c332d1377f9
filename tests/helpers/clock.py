"""A clock for ``svhn.train.time_budget`` that runs on epochs, not seconds."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class EpochClock(Callback):
    """Each training epoch takes ``SECONDS_PER_EPOCH`` of this clock (``EpochClock.now``)."""

    SECONDS_PER_EPOCH = 10.0
    now = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        EpochClock.now += self.SECONDS_PER_EPOCH
