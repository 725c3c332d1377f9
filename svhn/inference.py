"""Reading a split with trained checkpoints: the one prediction path of the project.

``predict_split(checkpoints, data_dir, split)`` loads each checkpoint's reader with its own
settings (``svhn.checkpoints``), feeds it the split exactly as validation did (same image
size, cache and evaluation scale, no augmentation, the precision it was validated in unless
told otherwise), runs ``lightning.Trainer.predict`` (so ``devices=2, strategy="ddp"`` works:
every rank's rows are gathered, each image exactly once), combines views (test-time
augmentation) and checkpoints (an ensemble), and returns one ``Predictions`` in file-name
order. Readers that run the zoom search combine by one vote over all their zoom chains
(``svhn.reader.vote``: every view's and every checkpoint's chains together); the others by
averaging their per-position probabilities. ``svhn.predict``, ``svhn.analysis``, ``svhn.bench``
and ``svhn.report`` all read through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from svhn.checkpoints import CheckpointContents, CheckpointError, load_reader, read_checkpoint
from svhn.data import SPLITS, SVHNDataModule
from svhn.reader import DigitReader, vote_probabilities

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names; 16-mixed: GPUs

# -- views (test-time augmentation) ---------------------------------------------------------
@dataclass(frozen=True)
class AffineView:
    """Zoom about the centre by ``scale``, move right by ``shift_x`` of the width; the
    border pixels are repeated so no black edges appear (the model never saw any)."""

    scale: float = 1.0
    shift_x: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0 and self.shift_x == 0.0:
            return images
        theta = images.new_tensor([[1 / self.scale, 0.0, -2 * self.shift_x],
                                   [0.0, 1 / self.scale, 0.0]])
        grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape),
                             align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def box_to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised (x0, y0, x1, y1) boxes found in this view -> the same places in the
        original image (so chains of different views can be compared by overlap)."""
        # The view samples the image at u / scale - 2 * shift_x, u in [-1, 1] coordinates.
        x = ((2 * boxes[..., 0::2] - 1) / self.scale - 2 * self.shift_x + 1) / 2
        y = ((2 * boxes[..., 1::2] - 1) / self.scale + 1) / 2
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


# Deterministic views of the normalised image batch. For readers without the zoom search,
# the first view of a list is the one whose box (with a box head) is reported.
VIEWS: dict[str, AffineView] = {
    "identity": AffineView(),
    "shift_left": AffineView(shift_x=-0.04),
    "shift_right": AffineView(shift_x=0.04),
    "zoom_in": AffineView(scale=1.08),
    "zoom_out": AffineView(scale=0.92),
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
    when the readers predict them, targets (N, max_len) when the split is labelled; with
    the zoom search, every zoom chain's probabilities (N, K, max_len, 11) and final box
    (N, K, 4), whose vote gave ``probs`` and ``boxes``."""

    file_names: list[str]
    probs: torch.Tensor
    boxes: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    chain_probs: torch.Tensor | None = None
    chain_boxes: torch.Tensor | None = None
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
    """Runs a reader over several views of each batch: one vote over all the views' zoom
    chains when the reader searches, else the views' probabilities averaged."""

    def __init__(self, reader: DigitReader, views: Sequence[str] = PLAIN_VIEWS):
        super().__init__()
        self.reader = reader
        self.views = check_views(views)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        images = self.reader.normalize(batch["image"])  # the views work on float images
        outputs = [self.reader(VIEWS[name](images)) for name in self.views]
        result = {"file_name": list(batch["file_name"]), "target": batch["target"]}
        if all("chain_logits" in o for o in outputs):
            result["chain_probs"] = torch.cat([o["chain_logits"].float().softmax(-1)
                                               for o in outputs], dim=1)
            result["chain_boxes"] = torch.cat([VIEWS[name].box_to_image(o["chain_boxes"]
                                                                        .float())
                                               for name, o in zip(self.views, outputs)], dim=1)
            result["probs"], result["box"] = vote_over_chains(result["chain_probs"],
                                                              result["chain_boxes"])
            return result
        result["probs"] = torch.stack([o["logits"].float().softmax(-1)
                                       for o in outputs]).mean(dim=0)
        if "box" in outputs[0]:
            result["box"] = outputs[0]["box"].float()
        return result


def vote_over_chains(chain_probs: torch.Tensor, chain_boxes: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities (N, max_len, 11) and box (N, 4) of the chain ``vote`` picks among
    (N, K, max_len, 11) chain probabilities ending on (N, K, 4) boxes."""
    winner = vote_probabilities(chain_probs.transpose(0, 1), chain_boxes.transpose(0, 1))
    rows = torch.arange(len(winner), device=winner.device)
    return chain_probs[rows, winner], chain_boxes[rows, winner]


def _from_batches(batches: Sequence[dict]) -> Predictions:
    names = [name for batch in batches for name in batch["file_name"]]
    probs = torch.cat([b["probs"].cpu() for b in batches]) if batches else torch.empty(0)
    targets = torch.cat([b["target"].cpu() for b in batches]) if batches else None

    def joined(key: str) -> torch.Tensor | None:  # on the CPU, as probs and targets
        return _cat_or_none([b[key].cpu() if key in b else None for b in batches])

    return Predictions(names, probs, joined("box"), targets, joined("chain_probs"),
                       joined("chain_boxes"))


def _gather_ranks(part: Predictions) -> list[Predictions]:
    """Every rank's predictions, on every rank (one part when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [part]
    # Plain tuples pickle the same in every rank, whatever module name this file runs as.
    parts: list[tuple | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (part.file_names, part.probs, part.boxes, part.targets,
                                   part.chain_probs, part.chain_boxes))
    return [Predictions(*p) for p in parts if p is not None]


def _cat_or_none(tensors: Sequence[torch.Tensor | None], dim: int = 0) -> torch.Tensor | None:
    if not tensors or any(t is None for t in tensors):
        return None
    return torch.cat(tensors, dim=dim)  # type: ignore[arg-type]


def _merge_sorted(parts: Sequence[Predictions], expected: Sequence[str]) -> Predictions:
    """One Predictions in file-name order; each expected image exactly once (else an error)."""
    parts = [p for p in parts if p.file_names]
    names = [n for p in parts for n in p.file_names]
    if sorted(names) != sorted(expected):
        raise RuntimeError(f"prediction returned {len(names)} rows ({len(set(names))} distinct) "
                           f"for {len(expected)} images; each image must appear exactly once.")
    order = sorted(range(len(names)), key=names.__getitem__)

    def ordered(key: str) -> torch.Tensor | None:
        joined = _cat_or_none([getattr(p, key) for p in parts])
        return joined[order] if joined is not None else None

    return Predictions([names[i] for i in order], torch.cat([p.probs for p in parts])[order],
                       ordered("boxes"), ordered("targets"), ordered("chain_probs"),
                       ordered("chain_boxes"))


def combine(members: Sequence[Predictions]) -> Predictions:
    """The ensemble. Members that all ran the zoom search: one vote over all their chains
    together (each member's chains back the others' where they agree on the reading and
    the place). Otherwise: mean probabilities (and boxes, when every member has them)."""
    first = members[0]
    for other in members[1:]:
        if other.file_names != first.file_names:
            raise RuntimeError("ensemble members predicted different images.")
    chain_probs = _cat_or_none([m.chain_probs for m in members], dim=1)
    chain_boxes = _cat_or_none([m.chain_boxes for m in members], dim=1)
    if chain_probs is not None and chain_boxes is not None:
        probs, boxes = vote_over_chains(chain_probs, chain_boxes)
        return Predictions(first.file_names, probs, boxes, first.targets, chain_probs,
                           chain_boxes)
    probs = torch.stack([m.probs for m in members]).mean(dim=0)
    boxes = None
    if all(m.boxes is not None for m in members):
        boxes = torch.stack([m.boxes for m in members]).mean(dim=0)  # type: ignore[misc]
    return Predictions(first.file_names, probs, boxes, first.targets)


def combination_notice(members: Sequence[Predictions], paths: Sequence[Path]) -> str:
    """Says how ``combine`` joins these members, and why when it cannot vote."""
    without = [path.name for path, m in zip(paths, members) if m.chain_probs is None]
    if not without:
        chains = sum(m.chain_probs.shape[1] for m in members)  # type: ignore[union-attr]
        return f"Ensemble of {len(members)}: one vote over all {chains} zoom chains."
    if len(without) == len(members):
        return f"Ensemble of {len(members)}: per-position probabilities averaged."
    return (f"Ensemble of {len(members)}: per-position probabilities averaged, not a vote over "
            f"zoom chains: {', '.join(without)} does not run the zoom search (--zoom_search "
            "turns it on for every checkpoint that zooms).")


# -- the data a checkpoint reads ----------------------------------------------------------------
def shared_max_len(contents: Sequence[CheckpointContents]) -> int:
    """Averaging or voting over positions needs the same number of them in every model of
    an ensemble."""
    lengths = {c.max_len for c in contents}
    if len(lengths) > 1:
        listing = ", ".join(f"{c.path.name}: {c.max_len}" for c in contents)
        raise CheckpointError(f"checkpoints disagree on max_len ({listing}); an ensemble "
                              "compares their readings position by position, so they must "
                              "match.")
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
    """Read a split with one or more checkpoints (and views), combined by ``combine``.

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
    if len(members) > 1 and is_global_zero():
        print(combination_notice(members, paths), flush=True)
    result = combine(members)
    if not labelled:
        result.targets = None  # unlabelled rows carry placeholder targets
    result.checkpoints, result.data_dir, result.split, result.views = paths, Path(data_dir), \
        split, views
    return result


def is_global_zero() -> bool:
    """True in the process that writes files (the only one unless distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
