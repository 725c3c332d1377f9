"""Reading a split with trained checkpoints: the one prediction path of the project.

``predict_split(checkpoints, data_dir, split)`` loads each checkpoint's reader with its own
settings (``svhn.checkpoints``), feeds it the split exactly as validation did (same image
size, cache and evaluation scale, no augmentation, the precision it was validated in unless
told otherwise), runs ``lightning.Trainer.predict`` (so ``devices=2, strategy="ddp"`` works:
every rank's rows are gathered, each image exactly once), averages the per-position
probabilities over views (test-time augmentation) and checkpoints (an ensemble), and returns
one ``Predictions`` in file-name order. ``svhn.predict``, ``svhn.analysis``, ``svhn.bench``
and ``svhn.report`` all read through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from svhn.checkpoints import CheckpointContents, CheckpointError, load_reader, read_checkpoint
from svhn.data import SPLITS, SVHNDataModule
from svhn.reader import DigitReader

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names; 16-mixed: GPUs

# -- views (test-time augmentation) ---------------------------------------------------------
View = Callable[[torch.Tensor], torch.Tensor]


def _affine_view(scale: float = 1.0, shift_x: float = 0.0) -> View:
    """Zoom about the centre by ``scale``, move right by ``shift_x`` of the width; the
    border pixels are repeated so no black edges appear (the model never saw any)."""

    def apply(images: torch.Tensor) -> torch.Tensor:
        theta = images.new_tensor([[1 / scale, 0.0, -2 * shift_x], [0.0, 1 / scale, 0.0]])
        grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape),
                             align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    return apply


# Deterministic views of the normalised image batch. The first view of a list is the one
# whose box (for readers with a box head) is reported.
VIEWS: dict[str, View] = {
    "identity": lambda images: images,
    "shift_left": _affine_view(shift_x=-0.04),
    "shift_right": _affine_view(shift_x=0.04),
    "zoom_in": _affine_view(scale=1.08),
    "zoom_out": _affine_view(scale=0.92),
}
PLAIN_VIEWS = ("identity",)
TTA_VIEWS = tuple(VIEWS)


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"unknown views {unknown}; choose from {sorted(VIEWS)}.")
    return tuple(views)


# -- what comes out ---------------------------------------------------------------------------
@dataclass
class Predictions:
    """Per-image outputs in file-name order: probabilities (N, max_len, 11), boxes (N, 4)
    when the readers predict them, targets (N, max_len) when the split is labelled."""

    file_names: list[str]
    probs: torch.Tensor
    boxes: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    checkpoints: list[Path] = field(default_factory=list)
    data_dir: Path | None = None
    split: str | None = None
    views: tuple[str, ...] = PLAIN_VIEWS

    def __len__(self) -> int:
        return len(self.file_names)

    @property
    def checkpoint(self) -> Path:
        """The first (or only) checkpoint: its run holds the training curves."""
        return self.checkpoints[0]

    @property
    def image_paths(self) -> list[Path]:
        if self.data_dir is None or self.split is None:
            raise ValueError("these predictions do not say which data they came from.")
        folder = Path(self.data_dir) / SPLITS[self.split][0]
        return [folder / name for name in self.file_names]


class ReaderPredictor(L.LightningModule):
    """Runs a reader over several views of each batch and averages the probabilities."""

    def __init__(self, reader: DigitReader, views: Sequence[str] = PLAIN_VIEWS):
        super().__init__()
        self.reader = reader
        self.views = check_views(views)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        images = self.reader.normalize(batch["image"])  # the views work on float images
        outputs = [self.reader(VIEWS[name](images)) for name in self.views]
        result = {"file_name": list(batch["file_name"]), "target": batch["target"],
                  "probs": torch.stack([o["logits"].float().softmax(-1)
                                        for o in outputs]).mean(dim=0)}
        if "box" in outputs[0]:
            result["box"] = outputs[0]["box"].float()
        return result


def _from_batches(batches: Sequence[dict]) -> Predictions:
    names = [name for batch in batches for name in batch["file_name"]]
    probs = torch.cat([b["probs"].cpu() for b in batches]) if batches else torch.empty(0)
    targets = torch.cat([b["target"].cpu() for b in batches]) if batches else None
    has_boxes = bool(batches) and all("box" in b for b in batches)
    boxes = torch.cat([b["box"].cpu() for b in batches]) if has_boxes else None
    return Predictions(names, probs, boxes, targets)


def _gather_ranks(part: Predictions) -> list[Predictions]:
    """Every rank's predictions, on every rank (one part when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [part]
    # Plain tuples pickle the same in every rank, whatever module name this file runs as.
    parts: list[tuple | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (part.file_names, part.probs, part.boxes, part.targets))
    return [Predictions(*p) for p in parts if p is not None]


def _cat_or_none(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.cat(tensors) if tensors and all(t is not None for t in tensors) else None


def _merge_sorted(parts: Sequence[Predictions], expected: Sequence[str]) -> Predictions:
    """One Predictions in file-name order; each expected image exactly once (else an error)."""
    parts = [p for p in parts if p.file_names]
    names = [n for p in parts for n in p.file_names]
    if sorted(names) != sorted(expected):
        raise RuntimeError(f"prediction returned {len(names)} rows ({len(set(names))} distinct) "
                           f"for {len(expected)} images; each image must appear exactly once.")
    order = sorted(range(len(names)), key=names.__getitem__)
    probs = torch.cat([p.probs for p in parts])[order]
    boxes = _cat_or_none([p.boxes for p in parts])
    targets = _cat_or_none([p.targets for p in parts])
    return Predictions([names[i] for i in order], probs,
                       boxes[order] if boxes is not None else None,
                       targets[order] if targets is not None else None)


def average(members: Sequence[Predictions]) -> Predictions:
    """The ensemble: mean probabilities (and boxes, when every member has them)."""
    first = members[0]
    for other in members[1:]:
        if other.file_names != first.file_names:
            raise RuntimeError("ensemble members predicted different images.")
    probs = torch.stack([m.probs for m in members]).mean(dim=0)
    boxes = None
    if all(m.boxes is not None for m in members):
        boxes = torch.stack([m.boxes for m in members]).mean(dim=0)  # type: ignore[misc]
    return Predictions(first.file_names, probs, boxes, first.targets)


# -- the data a checkpoint reads ----------------------------------------------------------------
def shared_max_len(contents: Sequence[CheckpointContents]) -> int:
    """Averaging positions needs the same number of them in every model of an ensemble."""
    lengths = {c.max_len for c in contents}
    if len(lengths) > 1:
        listing = ", ".join(f"{c.path.name}: {c.max_len}" for c in contents)
        raise CheckpointError(f"checkpoints disagree on max_len ({listing}); an ensemble "
                              "averages per-position probabilities, so they must match.")
    return lengths.pop()


def evaluation_datamodule(contents: CheckpointContents, data_dir: str | Path, split: str, *,
                          batch_size: int = 128, num_workers: int | None = 0,
                          cache_dir: str | Path | None = None,
                          labelled: bool = False) -> SVHNDataModule:
    """The split as the checkpoint's validation saw it: same size, cache scale and
    evaluation scale, no augmentation. ``labelled`` keeps only labelled images, with
    targets (error analysis); otherwise every image of the split (a submission)."""
    data = SVHNDataModule.evaluation_settings(contents.data)
    return SVHNDataModule(
        data_dir=str(data_dir), batch_size=batch_size, num_workers=num_workers,
        augment="none", predict_on=split, predict_labelled=labelled,
        cache_dir=str(cache_dir) if cache_dir else None,
        image_size=contents.image_size, max_len=contents.max_len,
        cache_scale=float(data.get("cache_scale", 1.0)),
        eval_scale=float(data.get("eval_scale", 1.0)),
    )


# -- the loop -----------------------------------------------------------------------------------
def build_trainer(accelerator: str = "auto", devices: int | str | list[int] = 1,
                  strategy: str | None = None, precision: str = "32-true",
                  callbacks: Sequence[L.Callback] = (), progress_bar: bool = True,
                  limit_batches: int | None = None) -> L.Trainer:
    """A Trainer for prediction only: nothing logged or saved."""
    return L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy or "auto",
                     precision=precision, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=progress_bar,
                     callbacks=list(callbacks), limit_predict_batches=limit_batches)


def predict_with_reader(reader: DigitReader, datamodule: SVHNDataModule, trainer: L.Trainer,
                        views: Sequence[str] = PLAIN_VIEWS, subset: bool = False
                        ) -> Predictions:
    """One reader over the data module's predict split, complete and sorted on every rank;
    ``subset``: the trainer limits the batches on purpose (the benchmark), so the rows are
    returned as they came, unchecked."""
    batches = trainer.predict(ReaderPredictor(reader, views), datamodule=datamodule,
                              return_predictions=True)
    part = _from_batches(batches or [])
    if subset:
        return part
    return _merge_sorted(_gather_ranks(part), datamodule.predict_set.names)


def predict_split(
    checkpoints: Sequence[str | Path], data_dir: str | Path, split: str = "test_a", *,
    views: Sequence[str] = PLAIN_VIEWS, batch_size: int = 128, num_workers: int | None = 0,
    accelerator: str = "auto", devices: int | str | list[int] = 1, strategy: str | None = None,
    precision: str | None = None, channels_last: bool | None = None,
    zoom_search: bool | None = None, cache_dir: str | Path | None = None,
    labelled: bool = False,
) -> Predictions:
    """Average the probabilities of one or more checkpoints (and views) over a split.

    ``precision`` None runs each checkpoint in the precision its validation ran in (what
    the score in its file name was measured with); ``channels_last`` None keeps each
    checkpoint's memory format, ``zoom_search`` None its search setting.
    """
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise CheckpointError("no checkpoint given.")
    views = check_views(views)
    contents = [read_checkpoint(p) for p in paths]
    shared_max_len(contents)
    trainers: dict[str, L.Trainer] = {}
    members = []
    for content in contents:
        run_precision = precision or content.precision
        if run_precision not in trainers:
            trainers[run_precision] = build_trainer(accelerator, devices, strategy,
                                                    run_precision)
        datamodule = evaluation_datamodule(content, data_dir, split, batch_size=batch_size,
                                           num_workers=num_workers, cache_dir=cache_dir,
                                           labelled=labelled)
        reader = load_reader(content, channels_last=channels_last,
                             zoom_search=zoom_search)
        if is_global_zero():
            source = "as given" if precision else "as validated"
            print(f"Reading {split} with {content.path.name} in {run_precision} ({source}).",
                  flush=True)
        members.append(predict_with_reader(reader, datamodule, trainers[run_precision], views))
    result = average(members)
    if not labelled:
        result.targets = None  # unlabelled rows carry placeholder targets
    result.checkpoints, result.data_dir, result.split, result.views = paths, Path(data_dir), \
        split, views
    return result


def is_global_zero() -> bool:
    """True in the process that writes files (the only one unless distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
