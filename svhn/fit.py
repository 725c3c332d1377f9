"""Train: ``python -m svhn.fit [--config configs/X.yaml ...] [--model.backbone resnet50 ...]``.

A LightningCLI over ``DigitSequenceModel`` and ``SVHNDataModule``. ``configs/default.yaml``
is always read first, so every other config only states what it changes. The ``fit``
subcommand is implied; ``validate`` and ``test`` can be named first
(``python -m svhn.fit validate --ckpt_path best.ckpt``).

Runs land in ``runs/<name>/version_N/`` (the resolved ``config.yaml``, metrics and
``checkpoints/``). ``--ckpt_path last`` resumes the newest run of that name in place.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from svhn.callbacks import RunSummaryWriter
from svhn.data import SVHNDataModule
from svhn.module import DigitSequenceModel
from svhn.run_summary import final_checkpoint, not_held_out_message, val_is_held_out

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test")


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
        parser.link_arguments("model.box_head", "data.box_targets")

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` (or a checkpoint inside a run) continues that same run."""
        if self.subcommand != "fit":
            return
        config = self.config.fit
        logger = config.trainer.logger
        if not config.ckpt_path or not hasattr(logger, "init_args"):
            return
        save_dir = logger.init_args.get("save_dir") or "runs"
        name = logger.init_args.get("name") or logger.init_args.get("project") or "svhn"
        if config.ckpt_path == "last":
            last = find_last_checkpoint(save_dir, name)
            if last is None:
                raise SystemExit(f"--ckpt_path last: no run with a last.ckpt under "
                                 f"{Path(save_dir, name)}; train once first.")
            config.ckpt_path = str(last)
        ckpt = Path(config.ckpt_path).resolve()
        if ckpt.parent.name == "checkpoints" and ckpt.parents[2] == Path(save_dir, name).resolve():
            version = ckpt.parents[1].name
            if logger.class_path.endswith("WandbLogger"):
                logger.init_args["id"] = version
                logger.init_args["resume"] = "allow"
            elif "version" in logger.init_args:
                logger.init_args["version"] = version
            print(f"Resuming {version} of {name} from {ckpt}", flush=True)

    def instantiate_trainer(self, **kwargs):
        """Every fit records its recipe, time and result in the run's ``run_summary.json``."""
        trainer = super().instantiate_trainer(**kwargs)
        configs = (self.config.get(self.subcommand) or {}).get("config") or []
        trainer.callbacks.append(RunSummaryWriter([str(c) for c in configs]))
        return trainer

    def before_fit(self) -> None:
        data = self.datamodule.hparams
        if not val_is_held_out(data.train_on, data.val_on):
            rank_zero_print("\n" + not_held_out_message(data.train_on, data.val_on) + "\n")

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.checkpoint_callback is None \
                or trainer.fast_dev_run:
            return
        print(final_summary(trainer, self.datamodule), flush=True)


def final_summary(trainer, datamodule: SVHNDataModule) -> str:
    """How a fit ends: its score, the checkpoint that is its result, the predict command."""
    train_on, val_on = datamodule.hparams.train_on, datamodule.hparams.val_on
    held_out = val_is_held_out(train_on, val_on)
    checkpoint, why = final_checkpoint(trainer, held_out)
    if held_out:
        lines = [f"Best val/seq_acc: {_score(trainer.checkpoint_callback.best_model_score)}"]
    else:
        last = trainer.callback_metrics.get("val/seq_acc")
        lines = [f"val/seq_acc at the last epoch: {_score(last)} (not held out)",
                 not_held_out_message(train_on, val_on)]
    return "\n".join(["", *lines, f"Checkpoint ({why}): {checkpoint}",
                      f"Predict: python -m svhn.predict {checkpoint} "
                      f"--data_dir {datamodule.data_dir}"])


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
    with warnings.catch_warnings():
        # Called from Python (tests, notebooks) the host's own argv is not ours to parse.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _run_cli(args, defaults)


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


def main() -> None:
    build_cli()


if __name__ == "__main__":
    main()
