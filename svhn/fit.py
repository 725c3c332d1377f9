"""Train: ``python -m svhn.fit [--config configs/X.yaml ...] [--model.backbone resnet50 ...]``.

A LightningCLI over ``DigitSequenceModel`` and ``SVHNDataModule``. ``configs/default.yaml``
is always read first, so every other config only states what it changes. The ``fit``
subcommand is implied; ``validate`` and ``test`` can be named first
(``python -m svhn.fit validate --ckpt_path best.ckpt``).

Runs land in ``runs/<name>/version_N/`` (the resolved ``config.yaml``, metrics and
``checkpoints/``). ``--ckpt_path last`` resumes the newest run of that name in place; a
resume is checked before anything starts (a real checkpoint, the same model, optimiser and
schedule), and a refused one leaves nothing behind.

The project's own errors (bad data, labels, images, checkpoints, settings) end the command
with one ``error: ...`` line and exit code 2, as ``svhn.predict`` and ``svhn.score`` do;
anything else keeps its traceback (that is a bug).
"""

from __future__ import annotations

import logging
import shlex
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from svhn.callbacks import RunSummaryWriter
from svhn.checkpoints import CheckpointContents, CheckpointError, read_checkpoint
from svhn.data import DataError, SVHNDataModule, framed
from svhn.images import ImageReadError
from svhn.labels import LabelFileError
from svhn.module import DigitSequenceModel
from svhn.run_summary import final_checkpoint, not_held_out_message, val_is_held_out

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test")
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
# A resumed run continues the checkpoint's own network, optimiser and schedule: these may
# not change (a changed one would be ignored or crash deep inside torch).
RESUME_FIXED_MODEL_SETTINGS = ("backbone", "hidden_dim", "feature_grid", "box_head",
                               "optimizer", "lr", "weight_decay", "momentum", "scheduler",
                               "step_epochs")
# Lightning's warnings and hints that say nothing about this project's runs.
HARMLESS_WARNINGS = (
    r".*does not have many workers.*",  # 0 workers is the choice on <= 2 cores
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning internals, torch 2.9+
    r"Precision .* is not supported by the model summary.*",
    r"LightningCLI's args parameter.*",  # from Python (tests, notebooks) argv is not ours
    r"Checkpoint directory .* exists and is not empty.*",  # a resumed run, in its own folder
)
HARMLESS_INFO = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches")


class ResumeError(ValueError):
    """A ``--ckpt_path`` that cannot be resumed (or evaluated) as asked."""


class _DropLightningHints(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(HARMLESS_INFO)


class SaveConfigOnce(SaveConfigCallback):
    """Never overwrites a run's config: a resumed run writes ``config_resumed_N.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir
        base = Path(self.config_filename).stem
        candidate, n = self.config_filename, 1
        while (Path(log_dir) / candidate).exists():
            candidate, n = f"{base}_resumed_{n}.yaml", n + 1
        self.config_filename = candidate
        super().setup(trainer, pl_module, stage)


class ResumeScheduleCheck(Callback):
    """Refuses a resume whose schedule would not fit the checkpoint's, before anything of
    the run is written (first among the callbacks' setup hooks).

    One-cycle and cosine schedules are sized for a run's total number of optimiser steps
    (max_epochs x batches per epoch); a resume restores that size from the checkpoint, so
    a run planned for more steps crashes mid-way ("Tried to step N times") and one planned
    for fewer never finishes its schedule.
    """

    def __init__(self, checkpoint: Path, scheduler: str, saved_steps: int):
        self.checkpoint, self.scheduler, self.saved_steps = checkpoint, scheduler, saved_steps

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        needed = trainer.estimated_stepping_batches
        if needed == self.saved_steps:
            return
        _remove_if_empty(trainer.log_dir)  # the logger may have made this run's folder
        planned = _planned_max_epochs(self.checkpoint)
        was = f" (its run had max_epochs {planned})" if planned is not None else ""
        raise ResumeError(
            f"{self.checkpoint}: its {self.scheduler} schedule is sized for {self.saved_steps} "
            f"optimiser steps{was}, but this run would take {needed:g} (max_epochs "
            f"{trainer.max_epochs}). A resume continues the checkpoint's schedule: keep "
            "max_epochs, batch size, devices and training data as they were (the run's "
            "config.yaml), or start a new run from its weights with --model.init_from "
            "CKPT instead of --ckpt_path."
        )


def _planned_max_epochs(checkpoint: Path) -> int | None:
    config = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name != "checkpoints" or not config.is_file():
        return None
    try:
        return yaml.safe_load(config.read_text())["trainer"]["max_epochs"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


def _remove_if_empty(folder: str | None) -> None:
    """An empty run folder (and its empty parent) made by this run is removed."""
    if folder is None:
        return
    for path in (Path(folder), Path(folder).parent):
        try:
            path.rmdir()  # only ever removes an empty folder
        except OSError:
            return


def checkpoint_to_resume(path: Path, for_resume: bool) -> CheckpointContents:
    """The checkpoint (through ``svhn.checkpoints``, the one reader); ResumeError when it is
    not one of this project's, or, to resume, holds no training state."""
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        raise ResumeError(str(err)) from None
    if for_resume and not checkpoint.training_state:
        raise ResumeError(
            f"{path}: holds weights only, no training state, so it cannot be resumed. Start "
            "a new run from its weights with --model.init_from instead of --ckpt_path."
        )
    return checkpoint


def _comparable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_resume_settings(path: Path, checkpoint: CheckpointContents, model: dict,
                          data: dict) -> None:
    """ResumeError naming every model setting that differs from the checkpoint's."""
    saved = checkpoint.model
    now = {key: model.get(key) for key in RESUME_FIXED_MODEL_SETTINGS}
    now["max_len"] = data.get("max_len")  # linked into the model from the data settings
    changed = [f"{'data' if key == 'max_len' else 'model'}.{key} {saved[key]!r} -> {value!r}"
               for key, value in now.items()
               if key in saved and _comparable(saved[key]) != _comparable(value)]
    if changed:
        raise ResumeError(
            f"{path}: cannot resume with changed settings ({'; '.join(changed)}). A resume "
            "continues the checkpoint's own network, optimiser and schedule: give the run's "
            "settings (its config.yaml), or start a new run from its weights with "
            "--model.init_from CKPT instead of --ckpt_path."
        )


def saved_schedule_steps(checkpoint: CheckpointContents) -> int | None:
    """The total steps a per-step schedule (one-cycle, cosine) in the checkpoint is sized
    for; None for schedules that do not depend on the run's length."""
    scheduler = checkpoint.model.get("scheduler")
    states = checkpoint.lr_schedulers
    if scheduler not in ("onecycle", "cosine") or not states:
        return None
    state = states[0]
    steps = state.get("total_steps") if scheduler == "onecycle" else state.get("T_max")
    return int(steps) if steps is not None else None


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """The newest ``<save_dir>/<name>/<version>/checkpoints/last.ckpt``, if any."""
    found = sorted(Path(save_dir, name).glob("*/checkpoints/last.ckpt"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class SVHNCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two public ModelCheckpoints: the best by val/seq_acc, and last.ckpt rewritten after
        # every epoch. (Lightning 2.6's own save_last refreshes last.ckpt only when a top-k
        # checkpoint was saved, so --ckpt_path last would resume from an older epoch.)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/seq_acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "epoch{epoch:03d}-seq_acc{val/seq_acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "last_checkpoint.filename": "last",
            "last_checkpoint.monitor": None,
            "last_checkpoint.save_top_k": 1,
            "last_checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.link_arguments("data.max_len", "model.max_len")
        parser.link_arguments("data.image_size", "model.image_size")
        # Boxes move with the image under augmentation only where a head learns from them.
        parser.link_arguments("model.box_head", "data.box_targets")
        parser.link_arguments("model.char_boxes", "data.char_box_targets")

    def _parse_ckpt_path(self) -> None:
        """A ``--ckpt_path`` is checked here, before anything is built or written.

        ``fit``: ``last`` (or a checkpoint inside a run) continues that same run. The file
        must be a training checkpoint, and the settings given (the run's config) must keep
        its network, optimiser and schedule; the settings given are the ones used. (Lightning
        would instead overwrite the model settings with the checkpoint's here, silently
        dropping any that were changed.) ``validate`` / ``test``: the file must be a
        checkpoint; the model's settings then come from it, as in Lightning.
        """
        self.resume_check: ResumeScheduleCheck | None = None
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        if subcommand != "fit":
            if config.ckpt_path not in LIGHTNING_CKPT_KEYWORDS:
                checkpoint_to_resume(Path(config.ckpt_path), for_resume=False)
                super()._parse_ckpt_path()
            return
        resuming = self._continue_the_run(config)
        path = Path(config.ckpt_path)
        checkpoint = checkpoint_to_resume(path, for_resume=True)
        check_resume_settings(path, checkpoint, dict(config.model), dict(config.data))
        steps = saved_schedule_steps(checkpoint)
        if steps is not None:
            self.resume_check = ResumeScheduleCheck(
                path, checkpoint.model["scheduler"], steps)
        if resuming:
            print(resuming, flush=True)

    def _continue_the_run(self, config) -> str | None:
        """Resolve ``last``; point the logger at the checkpoint's own run folder."""
        logger = config.trainer.logger
        if not hasattr(logger, "init_args"):
            return None
        save_dir = logger.init_args.get("save_dir") or "runs"
        name = logger.init_args.get("name") or logger.init_args.get("project") or "svhn"
        if config.ckpt_path == "last":
            last = find_last_checkpoint(save_dir, name)
            if last is None:
                raise ResumeError(f"--ckpt_path last: no run with a last.ckpt under "
                                  f"{Path(save_dir, name)}; train once first.")
            config.ckpt_path = str(last)
        ckpt = Path(config.ckpt_path).resolve()
        if ckpt.parent.name != "checkpoints" or \
                ckpt.parents[2] != Path(save_dir, name).resolve():
            return None
        version = ckpt.parents[1].name
        if logger.class_path.endswith("WandbLogger"):
            logger.init_args["id"] = version
            logger.init_args["resume"] = "allow"
        elif "version" in logger.init_args:
            logger.init_args["version"] = version
        return f"Resuming {version} of {name} from {ckpt}"


    def instantiate_trainer(self, **kwargs):
        """Every fit records its recipe, time and result in the run's ``run_summary.json``."""
        trainer = super().instantiate_trainer(**kwargs)
        configs = (self.config.get(self.subcommand) or {}).get("config") or []
        trainer.callbacks.append(RunSummaryWriter([str(c) for c in configs]))
        return trainer

    def before_fit(self) -> None:
        if self.resume_check is not None:  # first: before any callback writes a file
            self.trainer.callbacks.insert(0, self.resume_check)
        data = self.datamodule.hparams
        if not val_is_held_out(data.train_on, data.val_on):
            rank_zero_print("\n" + not_held_out_message(data.train_on, data.val_on) + "\n")

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.checkpoint_callback is None \
                or trainer.fast_dev_run:
            return
        print(final_summary(trainer, self.model, self.datamodule), flush=True)


def final_summary(trainer, model: DigitSequenceModel, datamodule: SVHNDataModule) -> str:
    """How a fit ends: what was trained on what, its score, the checkpoint that is its
    result and the next command; framed when it trained on the synthetic quick-start set."""
    train_on, val_on = datamodule.hparams.train_on, datamodule.hparams.val_on
    held_out = val_is_held_out(train_on, val_on)
    checkpoint, why = final_checkpoint(trainer, held_out)
    data_dir = datamodule.data_dir
    trained = (f"Trained {model.hparams.backbone} for {trainer.current_epoch} epoch(s) on "
               f"{len(datamodule.train_set):,} images of {data_dir}")
    val = f"({len(datamodule.val_set):,} {val_on} images)"
    if datamodule.uses_synthetic_fallback:
        val = f"on the synthetic val set {val}."
    predict = (f"python -m svhn.predict {shlex.quote(str(checkpoint))} --data_dir "
               f"{shlex.quote(str(data_dir))}")
    if held_out:
        score = [f"Best val/seq_acc: {_score(trainer.checkpoint_callback.best_model_score)} "
                 f"{val}"]
    else:
        last = trainer.callback_metrics.get("val/seq_acc")
        score = [f"val/seq_acc at the last epoch: {_score(last)} (not held out)",
                 not_held_out_message(train_on, val_on)]
    if model.reader.zoom_search:
        score.append("(read with one zoom chain during training; svhn.predict runs the zoom "
                     "search, which reads better)")
    if not datamodule.uses_synthetic_fallback:
        return "\n".join(["", f"{trained}.", *score, f"Checkpoint ({why}): {checkpoint}",
                          f"Predict: {predict}"])
    return "\n" + framed([
        f"{trained}: SYNTHETIC house numbers, not the competition's.",
        *score,
        f"Checkpoint ({why}): {checkpoint}",
        f"Read the synthetic val set: {predict} --split val",
        "Real data: unpack the competition files into data/mchar/ (see data/README.md)",
        "and run `python -m svhn.fit` again, or name their folder: --data.data_dir PATH.",
    ])


def _score(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


@rank_zero_only
def rank_zero_print(message: str) -> None:
    print(message, flush=True)


def build_cli(args: list[str] | None = None) -> SVHNCLI:
    """Parse ``args`` (default: the command line) and run; also usable from Python."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] not in SUBCOMMANDS:
        args = ["fit", *args]
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    hints = _DropLightningHints()
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_info.addFilter(hints)
    try:
        with warnings.catch_warnings():
            for message in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return _run_cli(args, defaults)
    finally:
        lightning_info.removeFilter(hints)


def _run_cli(args: list[str], defaults: list[str]) -> SVHNCLI:
    return SVHNCLI(
        DigitSequenceModel,
        SVHNDataModule,
        args=args,
        save_config_callback=SaveConfigOnce,
        parser_kwargs={sub: {"default_config_files": defaults} for sub in SUBCOMMANDS},
        trainer_defaults={
            "logger": {"class_path": "svhn.loggers.ResumableCSVLogger",
                       "init_args": {"save_dir": "runs", "name": "svhn"}},
        },
    )


PROJECT_ERRORS = (DataError, LabelFileError, ImageReadError, CheckpointError, ResumeError)


def is_project_error(err: BaseException) -> bool:
    """The project's own error classes, or a ValueError / FileNotFoundError raised by a
    ``raise`` in this package (a setting or file it refuses); not errors from inside torch,
    numpy or Lightning, which would be bugs."""
    if isinstance(err, PROJECT_ERRORS):
        return True
    if not isinstance(err, (ValueError, FileNotFoundError)) or err.__traceback__ is None:
        return False
    origin = Path(traceback.extract_tb(err.__traceback__)[-1].filename).resolve()
    return origin.is_relative_to(PACKAGE_DIR)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        build_cli(None if argv is None else list(argv))
    except Exception as err:
        if not is_project_error(err):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
