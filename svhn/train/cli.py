"""Train: ``python -m svhn.fit [--config configs/X.yaml ...] [--model.backbone resnet50 ...]``.

A LightningCLI over ``DigitSequenceModel`` and ``SVHNDataModule``. With no ``--config`` it
trains the quick start (``configs/default.yaml``); recipes named with ``--config`` are read
on the neutral base (the classes' own defaults, ``_run_cli``'s), left to right. The ``fit``
subcommand is implied; ``validate`` and ``test`` can be named first
(``python -m svhn.fit validate --ckpt_path best.ckpt``).

Runs land in ``runs/<name>/version_N/`` (the resolved ``config.yaml``, metrics and
``checkpoints/``). ``--ckpt_path last`` resumes the newest run of that name in place; a
resume is checked before anything starts (a real checkpoint, the same model, optimiser and
schedule), and a refused one leaves nothing behind.

A user's mistake (bad data, labels, images, checkpoints, settings: ``svhn.errors``) ends the
command with one ``error: ...`` line and exit code 2, as every command does; anything else
keeps its traceback (that is a bug).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from svhn.console import framed, quiet_libraries
from svhn.data.datamodule import SVHNDataModule
from svhn.errors import MissingInputError, SettingError, SvhnError, command
from svhn.model.training import DigitSequenceModel
from svhn.paths import QUICKSTART_CONFIG, RUNS_DIR, recipe
from svhn.run_dir import RunDir
from svhn.train.callbacks import RunSummaryWriter
from svhn.train.pseudo_labels import PseudoLabels
from svhn.train.resume import (
    LIGHTNING_CKPT_KEYWORDS,
    ResumeError,
    ResumeScheduleCheck,
    check_resume_settings,
    checkpoint_to_resume,
    find_last_checkpoint,
    saved_schedule_steps,
)
from svhn.train.run_summary import final_checkpoint, not_held_out_message, val_is_held_out
from svhn.train.time_budget import TimeBudget
from svhn.train.trainer import Trainer, rank_zero_print

__all__ = ["build_cli", "final_summary", "main", "SaveConfigOnce", "SVHNCLI"]

_SUBCOMMANDS = ("fit", "validate", "test")


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


class RecipeParser(LightningArgumentParser):
    """A refused command line or recipe is told in its error alone: the usage of several
    hundred options before it (what jsonargparse prints) hides the one line that matters."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a nested parse that tries one type of several
            return super().error(message, ex)
        lines = [line for line in str(message).splitlines() if line.strip()]
        shown = "\n  ".join(lines[:MAX_ERROR_LINES])
        more = f"\n  ... ({len(lines) - MAX_ERROR_LINES} more lines)" \
            if len(lines) > MAX_ERROR_LINES else ""
        sys.stderr.write(f"error: {shown}{more}\n(python -m svhn.fit --help lists every "
                         "option)\n")
        self.exit(2)


MAX_ERROR_LINES = 8


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
        # --time_budget.minutes M: the schedule and the run end within M minutes of training.
        parser.add_lightning_class_args(TimeBudget, "time_budget")
        # --pseudo_labels.rounds / .threshold: learning from --data.unlabelled images.
        parser.add_lightning_class_args(PseudoLabels, "pseudo_labels")
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
        checkpoint; the model's settings then come from it, as in Lightning. Either way the
        file is read by ``svhn.checkpoint_format`` first (weights only: one that holds
        anything else is refused before any of it runs), then by Lightning, also with
        ``weights_only=True`` (``_prepare_subcommand_kwargs``).
        """
        self.resume_check: ResumeScheduleCheck | None = None
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is not None and config.get("weights_only") is False:
            raise SettingError(
                "--weights_only false: svhn.fit opens checkpoints with weights_only=True "
                "only (a checkpoint is a pickle; unpickling it in full could run code). Drop "
                "the flag.")
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
                path, checkpoint.model["scheduler"], steps, checkpoint.budget_epochs)
        if resuming:
            print(resuming, flush=True)

    def _continue_the_run(self, config) -> str | None:
        """Resolve ``last``; point the logger at the checkpoint's own run folder."""
        logger = config.trainer.logger
        if not hasattr(logger, "init_args"):
            return None
        save_dir = logger.init_args.get("save_dir") or str(RUNS_DIR)
        name = logger.init_args.get("name") or logger.init_args.get("project") or "svhn"
        if config.ckpt_path == "last":
            last = find_last_checkpoint(save_dir, name, config.get("seed_everything"))
            if last is None:
                raise ResumeError(f"--ckpt_path last: no run with a last.ckpt under "
                                  f"{Path(save_dir, name)}; train once first.")
            config.ckpt_path = str(last)
        ckpt = Path(config.ckpt_path).resolve()
        run = RunDir.of_checkpoint(ckpt)
        if run is None or run.path.parent != Path(save_dir, name).resolve():
            return None
        version = run.path.name
        if logger.class_path.endswith("WandbLogger"):
            logger.init_args["id"] = version
            logger.init_args["resume"] = "allow"
        elif "version" in logger.init_args:
            logger.init_args["version"] = version
        return f"Resuming {version} of {name} from {ckpt}"


    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Lightning opens ``--ckpt_path`` (resume, validate, test) with weights_only=True,
        not torch's default (which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["weights_only"] = True
        return kwargs

    def before_instantiate_classes(self) -> None:
        """Trainer settings the model and data classes cannot see, checked before anything
        is built or written."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        max_epochs = config.trainer.get("max_epochs")
        if max_epochs is not None and max_epochs < -1:
            raise SettingError(f"trainer.max_epochs {max_epochs}: must be at least 1 (or -1: "
                               "no limit).")
        scheduler = config.model.get("scheduler")
        if max_epochs == -1 and scheduler in ("onecycle", "cosine"):
            raise SettingError(
                f"trainer.max_epochs -1 (no end) with model.scheduler {scheduler}: that "
                "schedule is sized for the run's whole length. Set --trainer.max_epochs N, "
                "or --model.scheduler none.")
        _check_logger_installed(config.trainer.get("logger"))

    def _run_subcommand(self, subcommand: str) -> None:
        """A run refused mid-way (data checked at setup, say) leaves no folder behind: the
        run folder this process claimed is removed while it holds no checkpoint."""
        try:
            super()._run_subcommand(subcommand)
        except SvhnError:
            _discard_claimed_run(self.trainer)
            raise

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
        if not any(isinstance(c, ModelSummary) for c in self.trainer.callbacks):
            # Lightning's table (--trainer.enable_model_summary true) is off by default
            rank_zero_print(model_line(self.model))

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.checkpoint_callback is None \
                or trainer.fast_dev_run:
            return
        print(final_summary(trainer, self.model, self.datamodule), flush=True)


def model_line(model: DigitSequenceModel) -> str:
    """The model in one line (Lightning's summary table, on with
    ``--trainer.enable_model_summary true``, adds little to it and counts no FLOPs)."""
    hp = model.hparams
    parameters = sum(p.numel() for p in model.parameters())
    head = "digit detector" if hp.get("head") == "detector" else "per-position heads"
    zoom = f", {hp.zoom_steps} zoom reads" if hp.get("zoom_steps") else ""
    return (f"Model: {hp.backbone} with {head}{zoom}, {parameters / 1e6:.1f} M parameters, "
            f"reading {hp.image_size[0]}x{hp.image_size[1]} images.")


def _discard_claimed_run(trainer) -> None:
    """Remove the run folder this process created, unless a checkpoint made it a run."""
    for logger in trainer.loggers:
        folder = getattr(logger, "claimed_dir", None)
        if folder is None or not folder.is_dir():
            continue
        if any(folder.glob(f"{RunDir.CHECKPOINTS}/*.ckpt")):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        for parent in (folder.parent, folder.parent.parent):  # runs/<name>/, runs/
            with contextlib.suppress(OSError):  # only ever removes an empty folder
                parent.rmdir()


def final_summary(trainer, model: DigitSequenceModel, datamodule: SVHNDataModule) -> str:
    """How a fit ends: what was trained on what, its score, the checkpoint that is its
    result and the next command; framed when it trained on the synthetic quick-start set."""
    train_on, val_on = datamodule.hparams.train_on, datamodule.hparams.val_on
    held_out = val_is_held_out(train_on, val_on)
    checkpoint, why = final_checkpoint(trainer, held_out)
    data_dir = datamodule.data_dir
    trained = (f"Trained {model.hparams.backbone} for {trainer.current_epoch} epoch(s) on "
               f"{datamodule.training_images_text()}")
    val = f"({len(datamodule.val_set):,} {val_on} images)"
    if datamodule.hparams.get("folds") is not None:
        of = "the synthetic train + val" if datamodule.uses_synthetic_fallback else \
            "train + val"
        val = (f"on fold {datamodule.hparams.fold}/{datamodule.hparams.folds} "
               f"({len(datamodule.val_set):,} held-out images of {of})")
    elif datamodule.uses_synthetic_fallback:
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
        "Real data: unpack the competition files into data/mchar/ (see data/README.md),",
        f"then train the real-data recipe: {REAL_DATA_COMMAND}",
    ])


# What the README recommends for real data (this quick start is a small VGG at 32x64).
REAL_DATA_COMMAND = "python -m svhn.fit --config configs/real_cpu.yaml --data.data_dir data/mchar"


def _score(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def build_cli(args: list[str] | None = None) -> SVHNCLI:
    """Parse ``args`` (default: the command line) and run; also usable from Python."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] not in _SUBCOMMANDS:
        args = ["fit", *args]
    args = _shipped_recipes(args)
    _check_config_files(args)
    with quiet_libraries():
        return _run_cli(args, defaults=_default_configs(args))


def _shipped_recipes(args: list[str]) -> list[str]:
    """A ``--config NAME.yaml`` or ``--config configs/NAME.yaml`` that is no file in the
    working folder names the recipe shipped with svhn (``svhn.paths.recipe``): the README's
    commands work from any folder, with an installed wheel too."""
    resolved, config_follows = [], False
    for arg in args:
        if config_follows:
            arg = recipe(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + recipe(arg.split("=", 1)[1])
        config_follows = arg in ("--config", "-c")
        resolved.append(arg)
    return resolved


def _check_config_files(args: Sequence[str]) -> None:
    """Every ``--config`` file is plain YAML: a syntax error is named with its file and line
    (the parser would say neither), a Python tag refused, before anything runs."""
    for path in _config_files(args):
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise SettingError(f"--config {path}: cannot be read ({err}).") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            if isinstance(err, yaml.constructor.ConstructorError):  # !!python/object, ...
                raise SettingError(f"--config {where}: a tag svhn never runs ({problem}); a "
                                   "recipe holds plain values only.") from None
            raise SettingError(f"--config {where}: not valid YAML ({problem}); fix that line "
                               "(indentation, a missing ':' or quote).") from None


def _config_files(args: Sequence[str]) -> list[Path]:
    """The files named by ``--config`` / ``-c`` (a value that is no file is left to the
    parser, which reads it as YAML text or says the file is missing)."""
    named = [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    named += [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")]
    return [Path(name) for name in named if Path(name).is_file()]


def _default_configs(args: Sequence[str]) -> list[str]:
    """The quick-start recipe when no ``--config`` is named; with one, the recipes named
    are read on the neutral base (the classes' own defaults and ``_run_cli``'s)."""
    if any(arg in ("--config", "-c") or arg.startswith("--config=") for arg in args):
        return []
    if not QUICKSTART_CONFIG.is_file():
        raise MissingInputError(
            f"{QUICKSTART_CONFIG}: the quick-start recipe is missing (python -m svhn.fit "
            "trains it when no --config is given): this install of svhn lacks its recipes. "
            "Name a recipe with --config FILE, or reinstall svhn from a checkout of the "
            "repository (pip install . or pip install -e .).")
    return [str(QUICKSTART_CONFIG)]


def _check_logger_installed(logger) -> None:
    """W&B logging (configs/wandb.yaml) needs the optional wandb package, TensorBoard
    logging (configs/tensorboard.yaml) tensorboard or tensorboardX: say so before anything
    is built or written, instead of Lightning's traceback from inside the parser."""
    loggers = logger if isinstance(logger, list) else [logger]
    for each in loggers:
        class_path = str(getattr(each, "class_path", "") or "")
        if class_path.endswith("WandbLogger") and importlib.util.find_spec("wandb") is None:
            raise SettingError(
                f"trainer.logger {class_path} (configs/wandb.yaml) logs to Weights & "
                "Biases, but wandb is not installed: pip install \"wandb>=0.17\" (the "
                "extra: pip install \"svhn[wandb]\", -e \".[wandb]\" in a checkout), or "
                "leave that config out to log to runs/ as CSV.")
        if class_path.endswith("TensorBoardLogger") and not any(
                importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
            raise SettingError(
                f"trainer.logger {class_path} (configs/tensorboard.yaml) writes TensorBoard "
                "event files, but neither tensorboard nor tensorboardX is installed: pip "
                "install tensorboard (or the lighter tensorboardX), or leave that config out "
                "to log to runs/ as CSV.")


def _run_cli(args: list[str], defaults: list[str]) -> SVHNCLI:
    # The neutral base every recipe starts from: one device, seed 42, the run folder under
    # runs/ (svhn.paths), metrics logged every 10 steps (short epochs on small data).
    return SVHNCLI(
        DigitSequenceModel,
        SVHNDataModule,
        args=args,
        save_config_callback=SaveConfigOnce,
        trainer_class=Trainer,  # Lightning's, with precision: auto
        parser_class=RecipeParser,
        seed_everything_default=42,
        # allow_abbrev False: argparse would take --trainer.max_epoch for max_epochs; a
        # typo in a recipe's flag is an error, not a guess.
        parser_kwargs={"allow_abbrev": False,
                       **{sub: {"default_config_files": defaults, "allow_abbrev": False}
                          for sub in _SUBCOMMANDS}},
        trainer_defaults={
            "devices": 1,
            "enable_model_summary": False,  # one line instead: model_line
            "log_every_n_steps": 10,
            "logger": {"class_path": "svhn.train.loggers.ResumableCSVLogger",
                       "init_args": {"save_dir": str(RUNS_DIR), "name": "svhn"}},
        },
    )


@command
def main(argv: Sequence[str] | None = None) -> int:
    build_cli(None if argv is None else list(argv))
    return 0
