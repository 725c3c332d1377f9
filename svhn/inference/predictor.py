"""Reading a split with trained checkpoints: the one prediction path of the project.

``predict_split(checkpoints, data_dir, split)`` loads each checkpoint's reader with its own
settings (``svhn.inference.checkpoints``), feeds it the split exactly as validation did (same image
size, cache and evaluation scale, no augmentation, the precision it was validated in unless
told otherwise), runs ``lightning.Trainer.predict`` (so ``devices=2, strategy="ddp"`` works:
every rank's rows are gathered, each image exactly once), combines views (test-time
augmentation) and checkpoints (an ensemble), and returns one ``Predictions`` in file-name
order. Readers that run the zoom search combine by one vote over all their zoom chains
(``svhn.model.vote``: every view's and every checkpoint's chains together); the others by
averaging their per-position probabilities. ``predict_photos`` does the same for any image
files (decoded as a split's images are, with each digit's box). ``svhn.predict``,
``svhn.read``, ``svhn.analysis``, ``svhn.bench`` and ``svhn.report`` all read through here.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from svhn.checkpoint_format import CheckpointContents, CheckpointError, read_checkpoint
from svhn.data.datamodule import SVHNDataModule, scaled_size
from svhn.data.photos import PhotoDataModule, Photos, decode_photos
from svhn.errors import SettingError, StoppedBySignal
from svhn.inference.checkpoints import load_reader
from svhn.inference.ensemble import combination_notice, combine, shared_max_len
from svhn.inference.predictions import Predictions, any_searched, merge_sorted
from svhn.inference.provenance import data_notice, fold_notice
from svhn.inference.views import PLAIN_VIEWS, VIEWS, check_views
from svhn.model.reader import DigitReader
from svhn.model.vote import pick_chain, winning_chain
from svhn.precision import AUTO, auto_precision, emulated_bf16_notice

__all__ = ["build_trainer", "evaluation_datamodule", "evaluation_sizes", "is_global_zero",
           "PRECISIONS", "PREDICT_BATCH_SIZE", "predict_photos", "predict_split",
           "predict_with_reader", "PredictionRows", "ReaderPredictor"]

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names; 16-mixed: GPUs
# Images per prediction batch (svhn.predict's --batch_size, and svhn.bench --search's).
PREDICT_BATCH_SIZE = 128


class ReaderPredictor(L.LightningModule):
    """Runs a reader over several views of each batch: one vote over all the views' zoom
    chains when the reader searches, else the views' probabilities averaged."""

    def __init__(self, reader: DigitReader, views: Sequence[str] = PLAIN_VIEWS,
                 digit_boxes: bool = False):
        super().__init__()
        self.reader = reader
        self.views = check_views(views)
        self.digit_boxes = digit_boxes  # each digit's box too (svhn.read draws them)
        self.rows = PredictionRows()

    def on_predict_start(self) -> None:
        self.rows = PredictionRows()

    def on_predict_batch_end(self, outputs: dict, batch: dict, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self.rows.add(outputs)

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
            winner = winning_chain(result["chain_probs"], result["chain_boxes"])
            result["probs"] = pick_chain(result["chain_probs"], winner)
            result["box"] = pick_chain(result["chain_boxes"], winner)
            if self.digit_boxes and all("chain_char_boxes" in o for o in outputs):
                result["chain_char_boxes"] = torch.cat(
                    [VIEWS[name].box_to_image(o["chain_char_boxes"].float())
                     for name, o in zip(self.views, outputs)], dim=1)
                result["char_boxes"] = pick_chain(result["chain_char_boxes"], winner)
            searched = any_searched([o.get("searched") for o in outputs])
            if searched is not None:
                result["searched"] = searched
            return result
        result["probs"] = torch.stack([o["logits"].float().softmax(-1)
                                       for o in outputs]).mean(dim=0)
        if "box" in outputs[0]:
            result["box"] = outputs[0]["box"].float()
        if self.digit_boxes and "char_boxes" in outputs[0]:
            result["char_boxes"] = VIEWS[self.views[0]].box_to_image(
                outputs[0]["char_boxes"].float())
        return result


class PredictionRows:
    """A prediction loop's rows, kept on the CPU in a few buffers that double as they fill.
    Keeping each batch's small output tensors instead (what ``return_predictions`` does)
    grows the process's heap by about 12 KB per image with glibc's allocator (each long-lived
    small block pins the heap above the large short-lived ones freed around it), and slows
    long predictions: docs/performance.md."""

    def __init__(self) -> None:
        self.file_names: list[str] = []
        self.buffers: dict[str, torch.Tensor] = {}
        self.absent: set[str] = set()  # keys some batch lacked: none kept

    def add(self, result: dict) -> None:
        count, rows = len(self.file_names), len(result["file_name"])
        self.absent |= {key for key in self.buffers if key not in result}
        for key, value in result.items():
            if key == "file_name" or key in self.absent:
                continue
            if count and key not in self.buffers:  # a key the first batches lacked
                self.absent.add(key)
                continue
            value = value.detach().cpu()
            buffer = self.buffers.get(key)
            if buffer is None or len(buffer) < count + rows:
                grown = value.new_empty((max(2 * (count + rows), 1024), *value.shape[1:]))
                if buffer is not None:
                    grown[:count] = buffer[:count]
                buffer = self.buffers[key] = grown
            buffer[count:count + rows] = value
        self.file_names.extend(result["file_name"])

    def predictions(self) -> Predictions:
        count = len(self.file_names)

        def kept(key: str) -> torch.Tensor | None:  # a copy: the rest of the buffer goes
            value = self.buffers.get(key) if key not in self.absent else None
            return None if value is None else value[:count].clone()

        probs = kept("probs")
        return Predictions(file_names=list(self.file_names),
                           probs=torch.empty(0) if probs is None else probs, boxes=kept("box"),
                           targets=kept("target"), chain_probs=kept("chain_probs"),
                           chain_boxes=kept("chain_boxes"), searched=kept("searched"),
                           char_boxes=kept("char_boxes"),
                           chain_char_boxes=kept("chain_char_boxes"))


def _gather_ranks(part: Predictions) -> list[Predictions]:
    """Every rank's predictions, on every rank (one part when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [part]
    # Plain dicts pickle the same in every rank, whatever module name this file runs as.
    parts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {key: getattr(part, key) for key in _GATHERED})
    return [Predictions(**p) for p in parts if p is not None]


_GATHERED = ("file_names", "probs", "boxes", "targets", "chain_probs", "chain_boxes",
             "searched", "char_boxes", "chain_char_boxes")


def evaluation_datamodule(contents: CheckpointContents, data_dir: str | Path, split: str, *,
                          batch_size: int = PREDICT_BATCH_SIZE, num_workers: int | None = 0,
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
class StopOnSigterm(L.Callback):
    """Lightning notes a SIGTERM but its prediction loop never looks at the note: stop at
    the next batch, before anything is written, as the fit loop stops."""

    def on_predict_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.received_sigterm:
            raise StoppedBySignal(signal.SIGTERM, "prediction stopped; nothing was written.")

    on_predict_batch_end = on_predict_batch_start


def build_trainer(accelerator: str = "auto", devices: int | str | list[int] = 1,
                  strategy: str | None = None, precision: str = "32-true",
                  callbacks: Sequence[L.Callback] = (), progress_bar: bool = True,
                  limit_batches: int | None = None) -> L.Trainer:
    """A Trainer for prediction only: nothing logged or saved."""
    return L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy or "auto",
                     precision=precision, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=progress_bar,
                     callbacks=[StopOnSigterm(), *callbacks],
                     limit_predict_batches=limit_batches)


def predict_with_reader(reader: DigitReader, datamodule: L.LightningDataModule,
                        trainer: L.Trainer, views: Sequence[str] = PLAIN_VIEWS,
                        subset: bool = False, digit_boxes: bool = False) -> Predictions:
    """One reader over the data module's predict split, complete and sorted on every rank;
    ``subset``: the trainer limits the batches on purpose (the benchmark), so the rows are
    returned as they came, unchecked. ``digit_boxes``: each digit's box too."""
    module = ReaderPredictor(reader, views, digit_boxes)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    part = module.rows.predictions()
    if subset:
        return part
    return merge_sorted(_gather_ranks(part), datamodule.predict_set.names)


def predict_split(
    checkpoints: Sequence[str | Path | CheckpointContents], data_dir: str | Path,
    split: str = "test_a", *,
    views: Sequence[str] = PLAIN_VIEWS, batch_size: int = PREDICT_BATCH_SIZE,
    num_workers: int | None = 0,
    accelerator: str = "auto", devices: int | str | list[int] = 1, strategy: str | None = None,
    precision: str | None = None, cache_dir: str | Path | None = None,
    labelled: bool = False, **reader_overrides: Any,
) -> Predictions:
    """Read a split with one or more checkpoints (and views), combined by ``combine``.

    ``precision`` None runs each checkpoint in the precision its validation ran in (what
    the score in its file name was measured with); ``reader_overrides`` replace each
    checkpoint's reader settings by name (``load_reader``: ``zoom_search``, ``search_gate``
    (1: the full search, every image), ...; None keeps the saved one). Each file is
    opened once (a ``CheckpointContents`` already read is not opened again): its settings
    and its reader come from that one read.
    """
    def data_for(content: CheckpointContents) -> L.LightningDataModule:
        return evaluation_datamodule(content, data_dir, split, batch_size=batch_size,
                                     num_workers=num_workers, cache_dir=cache_dir,
                                     labelled=labelled)

    def notices(content: CheckpointContents) -> tuple[str | None, ...]:
        return data_notice(content, data_dir), fold_notice(content, split)

    result = _predict(_opened(checkpoints), data_for, split, notices, views=views,
                      accelerator=accelerator, devices=devices, strategy=strategy,
                      precision=precision, reader_overrides=reader_overrides)
    if not labelled:
        result.targets = None  # unlabelled rows carry placeholder targets
    result.data_dir, result.split = Path(data_dir), split
    return result


def predict_photos(
    checkpoints: Sequence[str | Path | CheckpointContents], paths: Sequence[Path], *,
    views: Sequence[str] = PLAIN_VIEWS, batch_size: int = PREDICT_BATCH_SIZE,
    accelerator: str = "auto", precision: str | None = None, progress: bool = True,
    **reader_overrides: Any,
) -> tuple[Predictions, Photos]:
    """``predict_split`` for any image files: each decoded as a split's images are for that
    checkpoint (``svhn.data.photos``), read with each digit's box, combined the same way.
    Files that cannot be read are left out of the predictions and listed in the returned
    ``Photos.failed``; the ``Photos`` (of the first checkpoint's size) also give each
    photo's full size, to turn the normalised boxes into pixels. One device: photos are a
    person's handful, a split is ``predict_split``'s."""
    decoded: dict[tuple, Photos] = {}

    def photos_for(content: CheckpointContents) -> Photos:
        sizes = evaluation_sizes(content)
        if sizes not in decoded:
            decoded[sizes] = decode_photos(paths, *sizes, progress=progress)
        return decoded[sizes]

    def data_for(content: CheckpointContents) -> L.LightningDataModule:
        return PhotoDataModule(photos_for(content), content.max_len, batch_size)

    contents = _opened(checkpoints)
    first = photos_for(contents[0])
    if not first.names:
        raise SettingError(f"none of the {len(paths)} image file(s) could be read; the first: "
                           f"{next(iter(first.failed.values()))}")
    result = _predict(contents, data_for, "the images", lambda content: (), views=views,
                      accelerator=accelerator, devices=1, strategy=None,
                      precision=precision, reader_overrides=reader_overrides,
                      digit_boxes=True, progress=progress)
    result.targets = None
    return result, first


def evaluation_sizes(contents: CheckpointContents) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (height, width) a checkpoint's images are cached at, then fed at: its
    ``image_size`` times its data's ``cache_scale`` and ``eval_scale`` (what
    ``evaluation_datamodule`` sets up for a split, and ``predict_photos`` decodes photos at)."""
    data = SVHNDataModule.evaluation_settings(contents.data)
    return (scaled_size(contents.image_size, float(data.get("cache_scale", 1.0))),
            scaled_size(contents.image_size, float(data.get("eval_scale", 1.0))))


def _opened(checkpoints: Sequence[str | Path | CheckpointContents]
            ) -> list[CheckpointContents]:
    if not checkpoints:
        raise CheckpointError("no checkpoint given.")
    contents = [c if isinstance(c, CheckpointContents) else read_checkpoint(c)
                for c in checkpoints]
    shared_max_len(contents)
    return contents


def _predict(contents: Sequence[CheckpointContents],
             data_for: Callable[[CheckpointContents], L.LightningDataModule], what: str,
             notices: Callable[[CheckpointContents], Sequence[str | None]], *,
             views: Sequence[str], accelerator: str, devices: int | str | list[int],
             strategy: str | None, precision: str | None, reader_overrides: dict[str, Any],
             digit_boxes: bool = False, progress: bool = True) -> Predictions:
    """The one prediction loop: each checkpoint's reader over the data ``data_for`` gives
    it, in its precision, then the members combined (``combine``)."""
    views = check_views(views)
    paths = [content.path for content in contents]
    trainers: dict[str, L.Trainer] = {}
    members = []
    for content in contents:
        run_precision, source = _run_precision(precision, content.precision, accelerator)
        if run_precision not in trainers:
            trainers[run_precision] = build_trainer(accelerator, devices, strategy,
                                                    run_precision, progress_bar=progress)
        datamodule = data_for(content)
        reader = load_reader(content, **reader_overrides)
        if is_global_zero():
            print(f"Reading {what} with {content.path.name} in {run_precision} ({source}).",
                  flush=True)
            for notice in (emulated_bf16_notice(run_precision, accelerator, fix=_FLOAT32_FIX),
                           *notices(content)):
                if notice:
                    print(notice, flush=True)
        members.append(predict_with_reader(reader, datamodule, trainers[run_precision], views,
                                           digit_boxes=digit_boxes))
    if len(members) > 1 and is_global_zero():
        print(combination_notice(members, paths), flush=True)
    result = combine(members)
    result.checkpoints, result.views = paths, views
    return result


_FLOAT32_FIX = ("--precision auto (or 32-true) reads in float32, where the score may differ "
                "by an image or two.")


def _run_precision(asked: str | None, validated: str, accelerator: str) -> tuple[str, str]:
    """The precision a checkpoint reads in, and why: as asked, ``auto`` (the fastest this
    machine has: ``svhn.precision``), or as its validation ran (``asked`` None)."""
    if asked == AUTO:
        chosen, why = auto_precision(accelerator)
        return chosen, f"auto: {why}"
    return (asked, "as given") if asked else (validated, "as validated")


def is_global_zero() -> bool:
    """True in the process that writes files (the only one unless distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
