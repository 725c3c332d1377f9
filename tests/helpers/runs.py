"""Running the commands as a user does, the tests' plain model, and reading what a run
logged (metrics.csv, checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from helpers.repository import REPO

PLAIN_CONFIG = Path(__file__).with_name("plain.yaml")
# svhn.fit's flags for the tests' small model, first on a command line (flags after it
# win): any --config replaces configs/default.yaml by the neutral base, whatever recipe the
# quick start holds. plain.yaml says what it is.
PLAIN_MODEL = ["--config", str(PLAIN_CONFIG)]


def run_module(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m <args>`` of the repository under test in ``cwd``, output captured."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_predict(run, *checkpoints: Path, out: Path, split: str = "val",
                data_dir: Path | None = None, batch_size: int = 32,
                extra: Sequence[str] = ()) -> int:
    """``python -m svhn.predict`` in this process, CPU, no workers, on the data ``run``
    (a ``TrainedCheckpoint`` or an ``EasyRun``) was trained on, by default its best
    checkpoint; returns the exit code."""
    from svhn.inference import cli as predict_cli

    return predict_cli.main([
        *map(str, checkpoints or (run.best,)), "--data_dir", str(data_dir or run.data_dir),
        "--split", split, "--out", str(out), "--cache_dir", str(run.cache_dir),
        "--num_workers", "0", "--accelerator", "cpu", "--batch_size", str(batch_size),
        *extra])


# -------------------------------------------------------------------- the shared fits


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A short fit on ``synthetic_data_dir``: its checkpoints and the logged best score."""

    best: Path  # the checkpoint callback's best model (by val/seq_acc)
    last: Path  # last.ckpt of the same run
    val_seq_acc: float  # best_model_score: the val/seq_acc logged for ``best``
    log_dir: Path  # the run's folder (metrics.csv, config.yaml, checkpoints/)
    data_dir: Path
    cache_dir: Path


@dataclass(frozen=True)
class EasyRun:
    """A fit on ``easy_data_dir``: its best checkpoint, its last one and what it logged."""

    best: Path
    last: Path
    best_score: float  # the logged val/seq_acc of ``best``
    metrics: Path  # the run's metrics.csv
    data_dir: Path
    cache_dir: Path
    args: tuple[str, ...]  # the fit's arguments (model and data settings included)


EASY_FIT_ARGS = (
    *PLAIN_MODEL, "--data.num_workers", "0", "--data.batch_size", "32", "--data.max_len", "2",
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--model.scheduler", "none",
)


def fit_easy(data_dir: Path, cache_dir: Path, runs: Path, *extra: str) -> EasyRun:
    """``svhn.fit`` on the easy set in this process; ``extra`` adds or overrides flags."""
    from svhn.train.cli import build_cli

    args = ("--data.data_dir", str(data_dir), "--data.cache_dir", str(cache_dir),
            "--trainer.logger.init_args.save_dir", str(runs), *EASY_FIT_ARGS, *extra)
    cli = build_cli(list(args))
    callback = cli.trainer.checkpoint_callback
    return EasyRun(best=Path(callback.best_model_path),
                   last=Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt",
                   best_score=float(callback.best_model_score),
                   metrics=Path(cli.trainer.log_dir) / "metrics.csv", data_dir=data_dir,
                   cache_dir=cache_dir, args=args)


def short_fit_args(*extra: str) -> tuple[str, ...]:
    """``fit_easy`` flags for a run of a few steps at 32x64 without augmentation."""
    return ("--data.image_size", "[32, 64]", "--data.augment", "none",
            "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1", *extra)


# ------------------------------------------------------------------ what a run logged


def best_logged(metrics_csv: Path, key: str = "val/seq_acc") -> float:
    """The best value of ``key`` that the CSVLogger wrote."""
    return float(pd.read_csv(metrics_csv)[key].dropna().max())


def last_logged(metrics_csv: Path, key: str) -> float:
    """The last value of ``key`` that the CSVLogger wrote."""
    return float(pd.read_csv(metrics_csv)[key].dropna().iloc[-1])


def logged_row(run: EasyRun, epoch: int) -> pd.Series:
    """The validation metrics ``run`` logged at the end of ``epoch``."""
    metrics = pd.read_csv(run.metrics).dropna(subset=["val/seq_acc"])
    return metrics.loc[metrics["epoch"] == epoch].iloc[0]


def learning_rates(metrics_csv: Path, column: str) -> list[float]:
    """The learning rates logged in ``column`` (``lr-AdamW``, ...), in step order."""
    frame = pd.read_csv(metrics_csv)
    return frame.dropna(subset=[column]).sort_values("step")[column].tolist()


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint was saved at."""
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def fake_run(runs: Path, name: str, scores: list[float], max_epochs: int = 3,
             train_on: str = "[train]") -> Path:
    """A run folder as svhn.fit writes it, without the weights: sparse metrics rows."""
    run = runs / name / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"seed_everything: 1\ntrainer:\n  max_epochs: {max_epochs}\n"
        f"model:\n  backbone: {name}\ndata:\n  train_on: {train_on}\n  val_on: val\n")
    lines = ["epoch,lr-Adam,step,train/loss,val/seq_acc"]
    for epoch, score in enumerate(scores):
        lines += [f",0.001,{epoch * 5},,", f"{epoch},,{epoch * 5 + 4},1.5,",
                  f"{epoch},,{epoch * 5 + 4},,{score}"]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    best = max(range(len(scores)), key=scores.__getitem__)
    (run / "checkpoints" / f"epoch{best:03d}-seq_acc{scores[best]:.4f}.ckpt").write_bytes(b"")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run
