"""A learning-rate schedule that ends inside a time budget (``--time_budget.minutes M``).

A one-cycle or cosine schedule is sized for ``max_epochs``. On a slower machine (or a busy
one) those epochs take longer, and ``trainer.max_time`` then stops the run with the
learning rate still high: the last, most useful part of the schedule, its anneal, is never
run. ``TimeBudget`` re-plans after every epoch instead: the run gets the epochs that fit in
the time left (at most ``max_epochs``), each estimated from the time per training batch so
far (after the first epoch, of the batches since: the first holds the start-up) and the
epoch's size, the schedule is re-sized to end with them, and the run stops there, after
that epoch's validation and checkpoints. On a machine fast enough for ``max_epochs``
nothing changes. Epochs may grow (pseudo-labelled images joining them:
``svhn.train.pseudo_labels``): when an epoch's number of batches changes, the schedule is
re-sized to end with the planned epochs at that size, with or without a budget.
"""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

from svhn.errors import SettingError

__all__ = ["TimeBudget", "resize_schedule"]


def _now() -> float:
    """The clock (a function, so tests can run it faster than real time)."""
    return time.monotonic()


def resize_schedule(scheduler: Any, total_steps: int) -> bool:
    """Re-size a one-cycle or cosine schedule, in place, to end after ``total_steps``
    optimiser steps, continuing from the step it is at; False for any other schedule.

    One-cycle keeps its phases' end steps (``pct_start * total - 1``, ..., ``total - 1``);
    they are recomputed from the same ``pct_start``, so from here on it gives the rates and
    momenta of a one-cycle built for ``total_steps`` (tests/test_time_budget.py checks it
    against a fresh one), the next step's rate included. Cosine's rate is recursive: from
    the step after next it bends from its current value to reach ``eta_min`` at the new end.
    """
    if isinstance(scheduler, OneCycleLR):
        old, phases = scheduler.total_steps, scheduler._schedule_phases
        pct_start = (phases[0]["end_step"] + 1) / old
        phases[0]["end_step"] = pct_start * total_steps - 1
        if len(phases) == 3:  # three_phase=True
            phases[1]["end_step"] = 2 * pct_start * total_steps - 2
        phases[-1]["end_step"] = total_steps - 1
        scheduler.total_steps = total_steps
        scheduler.last_epoch -= 1  # the rate for the next step: the new cycle's, at once
        scheduler.step()
        return True
    if isinstance(scheduler, CosineAnnealingLR):
        scheduler.T_max = total_steps
        return True
    return False


# A plan grows back only to the epochs that fit with this share of an epoch to spare.
GROW_MARGIN = 0.5


class TimeBudget(Callback):
    """Fits the run's schedule, and its last epoch, into ``minutes`` of training.

    ``minutes`` None (the default) does nothing. Time counts from the start of training
    (after the data is set up), and a resumed run continues the count its checkpoint saved.
    The plan may grow back (never past ``max_epochs``) if epochs get faster, by the epochs
    that fit with half an epoch to spare (``GROW_MARGIN``).
    ``trainer.max_time`` is still the hard stop; set it a little above the budget.
    """

    def __init__(self, minutes: float | None = None) -> None:
        if minutes is not None and not minutes > 0:
            raise SettingError(f"time_budget.minutes {minutes}: must be above 0 (or null: no "
                               "budget).")
        self.minutes = minutes
        self.planned_epochs: int | None = None
        self.elapsed_before = 0.0  # training seconds of the run before this process resumed it
        self._started: float | None = None
        # (batches done, seconds) at the end of this process's first epoch, which also holds
        # the start-up (workers, cuDNN's autotuning): later estimates leave it out.
        self._first: tuple[int, float] | None = None
        self._batches_done = 0  # this process's training batches
        self._epoch_batches: int | None = None  # the current epoch's
        # Seconds of one-off work between epochs (a pseudo-labelling pass): spent from the
        # budget, but no part of what a further epoch takes.
        self._set_aside = 0.0
        self.epoch_seconds: float | None = None  # the latest estimate of a further epoch

    @property
    def state_key(self) -> str:
        return "TimeBudget"

    def state_dict(self) -> dict[str, Any]:
        return {"planned_epochs": self.planned_epochs, "elapsed_s": self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned_epochs = state_dict.get("planned_epochs")
        self.elapsed_before = float(state_dict.get("elapsed_s") or 0.0)

    def _elapsed(self) -> float:
        running = _now() - self._started if self._started is not None else 0.0
        return self.elapsed_before + running

    def on_train_start(self, trainer, pl_module) -> None:
        if self.minutes is not None:
            self._started = _now()
            if not self.elapsed_before:
                rank_zero_info(f"time budget {self.minutes:g} min of training: up to "
                               f"{trainer.max_epochs} epochs, fewer if they do not fit on this "
                               "machine (then said after the first epoch).")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        batches = trainer.num_training_batches
        if not isinstance(batches, int):  # an iterable without a length: nothing to plan
            return
        if self._epoch_batches is not None and batches != self._epoch_batches:
            self._resize_for_epochs_of(trainer, batches)
        self._epoch_batches = batches

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._batches_done += self._epoch_batches or 0
        if self.minutes is None or self._started is None:
            return
        done = trainer.current_epoch + 1  # the epoch that just ended, validation included
        elapsed = self._elapsed()
        batches = self._epoch_batches or 1
        if self._first is None:  # this process's first epoch: its start-up included
            self._first, per_epoch = (self._batches_done, elapsed), elapsed / done
        else:  # the batches since: what each further epoch will take, at its size
            per_batch = (elapsed - self._set_aside - self._first[1]) / max(
                1, self._batches_done - self._first[0])
            per_epoch = per_batch * batches
        self.epoch_seconds = per_epoch
        room = (self.minutes * 60 - elapsed) / per_epoch  # epochs that still fit
        most = trainer.max_epochs if (trainer.max_epochs or -1) > 0 else math.inf  # -1: no end
        def plan(epochs_that_fit: float) -> int:
            return int(max(done, min(most, done + max(0, math.floor(epochs_that_fit)))))

        planned = plan(room)
        if self.planned_epochs is not None and planned > self.planned_epochs:
            # Grown back only to what fits with GROW_MARGIN of an epoch to spare: epoch
            # times that wobble at a boundary (a GPU's 3-4 s) re-sized the schedule up and
            # down every epoch.
            planned = max(self.planned_epochs, plan(room - GROW_MARGIN))
        # Every process must stop at the same epoch: rank 0's clock decides.
        planned = int(trainer.strategy.broadcast(planned, src=0))
        if planned != (self.planned_epochs or most):
            self._replan(trainer, planned, done, per_epoch)
        self.planned_epochs = planned
        if done >= planned:
            trainer.should_stop = True

    def seconds_left(self) -> float | None:
        """Seconds of the budget not yet spent (None without a budget)."""
        if self.minutes is None or self._started is None:
            return None
        return self.minutes * 60 - self._elapsed()

    def set_aside(self, seconds: float) -> None:
        """Count ``seconds`` of one-off work after an epoch against the budget, but not
        into the time a further epoch is expected to take."""
        if self._first is not None:
            self._set_aside += seconds

    def _resize_for_epochs_of(self, trainer, batches: int) -> None:
        """The epochs ahead hold ``batches`` batches, not the last epoch's: the schedule is
        re-sized to end with the planned epochs at that size."""
        planned = self.planned_epochs or trainer.max_epochs
        if not planned or planned < 0:
            return
        if _resize_schedules(trainer, planned - trainer.current_epoch, batches):
            rank_zero_info(f"epochs now hold {batches} batches (before: "
                           f"{self._epoch_batches}); the schedule now ends after epoch "
                           f"{planned}.")

    def _replan(self, trainer, planned: int, done: int, per_epoch: float) -> None:
        resized = _resize_schedules(trainer, planned - done, self._epoch_batches or 1)
        what = "the schedule now ends there" if resized else "no schedule to re-size"
        rank_zero_info(f"time budget {self.minutes:g} min: {planned} epochs fit at "
                       f"{per_epoch:.0f} s per epoch (max_epochs {trainer.max_epochs}); "
                       f"{what}.")


def _resize_schedules(trainer, epochs_left: int, batches: int) -> bool:
    """Re-size the run's per-step schedules to end after ``epochs_left`` more epochs of
    ``batches`` batches (in optimiser steps); False when there is none to re-size."""
    steps = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
    total = max(1, trainer.global_step + max(0, epochs_left) * steps)
    resized = [resize_schedule(config.scheduler, total)
               for config in trainer.lr_scheduler_configs if config.interval == "step"]
    return any(resized)
