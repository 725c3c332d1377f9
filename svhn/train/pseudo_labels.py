"""Learning from images without labels: rounds of pseudo-labels inside one fit.

With ``--data.unlabelled test_a``, after the epochs at each of ``--pseudo_labels.rounds``
(fractions of the run's planned epochs: ``--time_budget``'s plan, else ``max_epochs``) the
model being trained reads every unlabelled image as ``svhn.predict --no-zoom_search``
would (one zoom chain; ``--pseudo_labels.search true``: its zoom search, which reads better
but costs several times the pass), and its answers confident enough
(``--pseudo_labels.threshold``, ``svhn.model.vote.answer_confidence``) become training
targets, each digit with the box the reader found for it. From the next epoch on they
train beside the labelled images (``svhn.data.unlabelled``), replacing the previous
round's; the schedule follows the larger epochs (``svhn.train.time_budget``). So the
model learns, under the training augmentation, from its own confident readings of images
like the ones it will be scored on: self-training in the manner of Noisy Student, in
rounds rather than online, because one reading pass costs far less on a CPU than a second
forward pass at every step.

The pseudo-labels are kept in the callback's state (checkpoints), so a resumed run trains
on the same ones.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from svhn.data.datasets import DigitImageDataset, collate_batch
from svhn.data.labels import Sample
from svhn.data.unlabelled import pseudo_samples
from svhn.errors import SettingError
from svhn.model.vote import answer_confidence
from svhn.train.time_budget import TimeBudget

__all__ = ["PseudoLabels", "read_unlabelled"]

SYNTHETIC_CHOICES = ("keep", "drop")


class PseudoLabels(Callback):
    """Rounds of pseudo-labels for ``--data.unlabelled`` (does nothing without it).

    Args:
        rounds: after which share of the planned epochs each round reads the unlabelled
            images (0 < share < 1, ascending); a later round relabels with a better model.
        threshold: the least ``answer_confidence`` a reading needs to become a target (a
            product of the positions' top probabilities, which label smoothing keeps well
            below 1: ``python -m svhn.bench --pseudo_labels CKPT`` shows what each keeps).
        search: read with the reader's zoom search (as ``svhn.predict``), not one chain.
        batch_size: images per read.
        synthetic: ``keep`` the ``data.synthetic_extra`` images beside the pseudo-labelled
            ones, or ``drop`` them from the first round on: real images take the place of
            generated ones, and the epochs stay short, so more of them fit a time budget.
    """

    def __init__(self, rounds: Sequence[float] = (0.5, 0.75), threshold: float = 0.3,
                 search: bool = False, batch_size: int = 128, synthetic: str = "keep") -> None:
        rounds = [float(r) for r in rounds]
        if not rounds or any(not 0 < r < 1 for r in rounds) or rounds != sorted(rounds):
            raise SettingError(f"pseudo_labels.rounds {rounds}: shares of the run between 0 "
                               "and 1, ascending (e.g. [0.5, 0.75]).")
        if not 0 < threshold <= 1:
            raise SettingError(f"pseudo_labels.threshold {threshold}: a confidence in (0, 1].")
        if batch_size < 1:
            raise SettingError(f"pseudo_labels.batch_size {batch_size}: must be at least 1.")
        if synthetic not in SYNTHETIC_CHOICES:
            raise SettingError(f"pseudo_labels.synthetic {synthetic!r}: choose one of "
                               f"{SYNTHETIC_CHOICES}.")
        self.drop_synthetic = synthetic == "drop"
        self.rounds, self.threshold, self.search = rounds, threshold, search
        self.batch_size = batch_size
        self.rounds_done = 0
        self.samples: list[Sample] = []
        self._reload_before: int | None = None
        self._pass_seconds: float | None = None  # the last round's reading pass

    @property
    def state_key(self) -> str:
        return "PseudoLabels"

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done,
                "samples": [[s.file_name, list(s.digits), [list(b) for b in s.boxes]]
                            for s in self.samples]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_done = int(state_dict.get("rounds_done", 0))
        self.samples = [Sample(name, tuple(digits), tuple(tuple(b) for b in boxes))
                        for name, digits, boxes in state_dict.get("samples", [])]

    @staticmethod
    def _active(trainer) -> bool:
        datamodule = trainer.datamodule
        return datamodule is not None and datamodule.hparams.get("unlabelled") is not None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        if not pl_module.hparams.get("char_boxes"):
            raise SettingError(
                f"data.unlabelled {trainer.datamodule.hparams.unlabelled}: a pseudo-label "
                "needs each digit's box, which a reader learns with --model.char_boxes true "
                "(configs/real_cpu.yaml sets it).")
        if self.samples:  # resumed after a round: the same targets as before
            trainer.datamodule.set_pseudo_labels(self.samples, self.drop_synthetic)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._reload_before is not None:  # the loader was rebuilt for this epoch
            trainer.reload_dataloaders_every_n_epochs = self._reload_before
            self._reload_before = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._active(trainer) or self.rounds_done >= len(self.rounds) \
                or trainer.should_stop:
            return
        done, planned = trainer.current_epoch + 1, _planned_epochs(trainer)
        if done >= planned or done < math.ceil(self.rounds[self.rounds_done] * planned):
            return
        budget = _time_budget(trainer)
        if self._too_late(budget):
            self.rounds_done += 1
            rank_zero_info(
                f"pseudo-labels, round {self.rounds_done} skipped: a reading pass as long as "
                f"the last ({self._pass_seconds:.0f} s) would leave less than two epochs of "
                "the time budget.")
            return
        datamodule = trainer.datamodule
        start = time.monotonic()
        dataset = datamodule.unlabelled_set()
        names, probs, char_boxes, confidence = read_unlabelled(
            pl_module.reader, dataset, batch_size=self.batch_size, search=self.search,
            device=pl_module.device, autocast=trainer.precision_plugin.forward_context,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            stop=lambda: trainer.received_sigterm)
        sizes = dataset.cache.original_sizes[dataset.cache_index]
        self.samples = pseudo_samples(names, probs, char_boxes, confidence, sizes,
                                      self.threshold)
        datamodule.set_pseudo_labels(self.samples, self.drop_synthetic)
        self.rounds_done += 1
        # Lightning rebuilds the train loader (its workers hold the old dataset) only on
        # this schedule; set back once the next epoch has its new loader.
        self._reload_before = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1
        seconds = self._pass_seconds = time.monotonic() - start
        if budget is not None:
            budget.set_aside(seconds)
        kept = len(self.samples) / max(1, len(names))
        pl_module.log("pseudo/kept_share", kept, on_epoch=True, rank_zero_only=True)
        rank_zero_info(
            f"pseudo-labels, round {self.rounds_done} after epoch {done} of {planned}: read "
            f"{len(names):,} unlabelled images in {seconds:.0f} s; {len(self.samples):,} "
            f"({kept:.0%}) at confidence >= {self.threshold:g} train from the next epoch.")


    def _too_late(self, budget: TimeBudget | None) -> bool:
        """A later round whose pass, as long as the last one, would leave the budget less
        than two epochs to train on what it read."""
        left = budget.seconds_left() if budget is not None else None
        if left is None or self._pass_seconds is None:
            return False
        return left < self._pass_seconds + 2 * (budget.epoch_seconds or 0.0)


def _time_budget(trainer) -> TimeBudget | None:
    return next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)


def _planned_epochs(trainer) -> float:
    """The run's planned length: the time budget's plan, else ``max_epochs``."""
    budget = _time_budget(trainer)
    if budget is not None and budget.planned_epochs is not None:
        return budget.planned_epochs
    return int(trainer.max_epochs) if (trainer.max_epochs or -1) > 0 else math.inf


@torch.no_grad()
def read_unlabelled(reader: torch.nn.Module, dataset: DigitImageDataset, *, batch_size: int,
                    search: bool, device: torch.device, autocast=None,
                    progress: bool = False, stop: Callable[[], bool] | None = None
                    ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image of ``dataset`` read as ``svhn.predict`` reads it (eval mode; the zoom
    search when ``search``): file names, answers' probabilities (N, max_len, 11), digit
    boxes (N, max_len, 4, whole-image fractions) and ``answer_confidence`` (N,). Under DDP
    each rank reads its share and all get every row, in the dataset's order. ``stop``: asked
    before each batch; True ends the pass as Lightning ends a fit told to stop (SIGTERM)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    rows = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_batch)
    was_training = reader.training
    reader.eval()
    parts: list[dict[str, torch.Tensor]] = []
    try:
        for batch in tqdm(loader, desc="pseudo-labels", leave=False, disable=not progress):
            if stop is not None and stop():
                raise SIGTERMException
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = reader(batch["image"].to(device), search=search)
            probs = out["logits"].float().softmax(-1)
            chains = out.get("chain_logits")
            confidence = answer_confidence(
                probs, None if chains is None else chains.float().softmax(-1),
                out.get("chain_boxes"))
            parts.append({"probs": probs.cpu(), "char_boxes": out["char_boxes"].float().cpu(),
                          "confidence": confidence.cpu()})
    finally:
        reader.train(was_training)
    mine = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else {}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (rows, mine))
        order = torch.tensor([row for part_rows, _ in gathered for row in part_rows])
        mine = {key: torch.cat([part[key] for _, part in gathered if part])[order.argsort()]
                for key in mine}
    names = [dataset.names[i] for i in range(len(dataset))]
    return names, mine["probs"], mine["char_boxes"], mine["confidence"]
