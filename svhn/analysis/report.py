"""Error-analysis report: ``python -m svhn.report --ckpt_path CKPT --out DIR``.

Predicts a labelled split (``--split val``) with the checkpoint and writes PNG figures
(confusion, accuracy by length and position, the most confident mistakes, training curves)
and a ``report.md`` that embeds them and states the numbers. ``--data_figures`` adds the data
exploration figures (label lengths, digits, image sizes, boxes, samples, augmentations).

It also finds the inputs the notebooks use, so they run from any folder:
- data: ``--data_dir``, else ``SVHN_DATA_DIR``, else the checkpoint's own data folder, else
  ``data/mchar``, else ``data/synthetic`` (svhn.fit's fallback), else a small synthetic set
  generated into ``data/synthetic_small``;
- checkpoint: ``SVHN_CKPT``, else the newest ``runs/*/version_*/checkpoints/*.ckpt`` that is
  not ``last.ckpt``, else a tiny model trained on synthetic data;
- cache: ``SVHN_CACHE_DIR`` (one sub-folder per dataset), else ``data/cache``; never inside
  the dataset, which may be read-only.
Relative paths are tried against the working directory, then the repository root.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from svhn.analysis import plots, tables
from svhn.checkpoint_format import CheckpointContents, read_checkpoint
from svhn.data.images import default_cache_dir
from svhn.data.layout import has_competition_data
from svhn.errors import MissingInputError, OutputExistsError, command
from svhn.inference.predictions import Predictions
from svhn.inference.provenance import data_kind, fold_notice, training_data
from svhn.paths import CACHE_DIR, DATA_DIR, RUNS_DIR, SYNTHETIC_DIR, SYNTHETIC_SMALL_DIR
from svhn.train.run_summary import TrainingData

__all__ = ["cache_dir_for", "data_dir_for_checkpoint", "DATA_FIGURES", "ERROR_FIGURES",
           "find_checkpoint", "find_data_dir", "find_or_train_checkpoint", "main",
           "markdown_table", "report_markdown", "scored_on", "synthetic_data_dir",
           "train_tiny_checkpoint",
           "write_data_figures", "write_report"]

ERROR_FIGURES = ("confusion", "accuracy_by_length", "accuracy_by_position",
                 "confident_mistakes", "curves")
DATA_FIGURES = ("length_distribution", "digit_distribution", "image_sizes", "box_geometry",
                "sample_grid", "augmentations")


# --------------------------------------------------------------------------- finding inputs


def _resolve_path(path: str | Path) -> Path:
    """An absolute path, relative ones taken from the working folder (``svhn.paths``)."""
    return Path(path).expanduser().resolve()


def synthetic_data_dir(n_train: int = 300, n_val: int = 100) -> Path:
    """A small synthetic set in ``data/synthetic_small``, generated on first use."""
    if not has_competition_data(SYNTHETIC_SMALL_DIR):
        from svhn.data.synthetic import generate_dataset

        print(f"No data found; generating a small synthetic set in {SYNTHETIC_SMALL_DIR}.")
        generate_dataset(SYNTHETIC_SMALL_DIR, n_train=n_train, n_val=n_val, n_test=20, seed=0)
    return SYNTHETIC_SMALL_DIR


def find_data_dir(preferred: Sequence[str | Path | None] = ()) -> Path:
    """The first folder with competition data: ``preferred``, SVHN_DATA_DIR, data/mchar,
    data/synthetic; else a small generated synthetic set.

    SVHN_DATA_DIR, when set, must hold the data (a typo should fail, not fall back)."""
    env = os.environ.get("SVHN_DATA_DIR")
    for candidate in preferred:
        if candidate and has_competition_data(_resolve_path(candidate)):
            return _resolve_path(candidate)
    if env:
        path = _resolve_path(env)
        if not has_competition_data(path):
            raise MissingInputError(f"SVHN_DATA_DIR={env}: no mchar_train/ and "
                                    "mchar_train.json there.")
        return path
    for candidate in (DATA_DIR, SYNTHETIC_DIR):
        if has_competition_data(candidate):
            return candidate
    return synthetic_data_dir()


def cache_dir_for(data_dir: str | Path) -> Path:
    """Where decoded images of ``data_dir`` are cached (SVHN_CACHE_DIR or data/cache)."""
    root = os.environ.get("SVHN_CACHE_DIR") or CACHE_DIR
    return default_cache_dir(data_dir, root=_resolve_path(root))


def find_checkpoint(runs_dir: str | Path = RUNS_DIR) -> Path | None:
    """The newest ``<runs>/*/version_*/checkpoints/*.ckpt`` that is not ``last.ckpt``."""
    found = [p for p in Path(runs_dir).glob("*/version_*/checkpoints/*.ckpt")
             if p.name != "last.ckpt"]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def train_tiny_checkpoint(data_dir: str | Path, runs_dir: str | Path,
                          cache_dir: str | Path, epochs: int = 2) -> Path:
    """Fit the quick-start recipe (configs/default.yaml) for a few epochs on CPU; return its
    best checkpoint (run in ``<runs_dir>/tiny/version_N``, with metrics.csv)."""
    from svhn.train.cli import build_cli

    cli = build_cli([
        "--data.data_dir", str(data_dir), "--data.cache_dir", str(cache_dir),
        "--data.num_workers", "0", "--data.batch_size", "16",
        "--data.synthetic_fallback", "false",
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu",
        "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(runs_dir),
        "--trainer.logger.init_args.name", "tiny",
    ])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def find_or_train_checkpoint(runs_dir: str | Path = RUNS_DIR) -> Path:
    """SVHN_CKPT, else the newest checkpoint under ``runs_dir``, else a tiny fresh one."""
    env = os.environ.get("SVHN_CKPT")
    if env:
        path = _resolve_path(env)
        if not path.is_file():
            raise MissingInputError(f"SVHN_CKPT={env}: checkpoint not found.")
        return path
    found = find_checkpoint(runs_dir)
    if found is not None:
        return found
    data_dir = synthetic_data_dir()
    print(f"No checkpoint under {runs_dir}; training a tiny one on {data_dir}.")
    return train_tiny_checkpoint(data_dir, runs_dir, cache_dir_for(data_dir))


def data_dir_for_checkpoint(checkpoint: str | Path | CheckpointContents) -> Path:
    """SVHN_DATA_DIR, else the data the checkpoint was trained on, else ``find_data_dir``."""
    if os.environ.get("SVHN_DATA_DIR"):
        return find_data_dir()
    contents = checkpoint if isinstance(checkpoint, CheckpointContents) else \
        read_checkpoint(checkpoint)
    trained_on = contents.data.get("data_dir")
    return find_data_dir([trained_on])


# --------------------------------------------------------------------------- writing


def _write_error_figures(pred: Predictions, out: Path, n_mistakes: int = 16,
                        contents: CheckpointContents | None = None) -> dict[str, Path]:
    """The error-analysis PNGs for ``pred`` in ``out``, by figure name (``contents``: its
    checkpoint already read, else it is read here for its epoch)."""
    contents = contents or read_checkpoint(pred.checkpoint)
    score = tables.sequence_accuracy(pred.probs, pred.targets)
    trained = training_data(contents)
    figures = {
        "confusion": plots.confusion(tables.confusion_matrix(pred.probs, pred.targets)),
        "accuracy_by_length": plots.accuracy_by_length(
            tables.accuracy_by_length(tables.prediction_table(pred)), score,
            scored_on=scored_on(pred)),
        "accuracy_by_position": plots.accuracy_by_position(
            tables.accuracy_by_position(pred.probs, pred.targets)),
        "confident_mistakes": plots.confident_mistakes(
            tables.confident_mistakes(pred, n_mistakes)),
        "curves": plots.training_curves(
            tables.read_metrics(tables.run_dir_of(pred.checkpoint)),
            contents.epoch, trained_on=trained.describe() if trained else None,
            data_label=trained.label if trained else None),
    }
    return {name: plots.save(fig, out / f"{name}.png") for name, fig in figures.items()}


def write_data_figures(data_dir: Path, cache_dir: Path, out: Path) -> dict[str, Path]:
    """The data-exploration PNGs for ``data_dir`` in ``out``, by figure name."""
    table = tables.sample_table(data_dir)
    figures = {
        "length_distribution": plots.length_distribution(tables.length_counts(table)),
        "digit_distribution": plots.digit_distribution(
            tables.digit_counts(table), tables.digit_position_counts(table)),
        "image_sizes": plots.image_sizes(table),
        "box_geometry": plots.box_geometry(table),
        "sample_grid": plots.sample_grid(tables.load_examples(data_dir, "train", n=16)),
        "augmentations": plots.augmentation_grid(
            tables.augmentation_draws(data_dir, cache_dir, n_images=2)),
    }
    return {name: plots.save(fig, out / f"{name}.png") for name, fig in figures.items()}


def markdown_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A small DataFrame as a GitHub markdown table (``formats``: column -> format spec)."""
    formats = formats or {}
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---:" for _ in frame.columns) + "|"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = [format(value, formats.get(column, "")) if pd.notna(value) else "–"
                 for column, value in zip(frame.columns, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scored_on(pred: Predictions) -> str:
    """The images a report scores: ``competition val (PATH)`` or ``synthetic val (PATH)``."""
    return f"{data_kind(pred.data_dir)} {pred.split} ({pred.data_dir})"


def _data_lines(pred: Predictions, trained: TrainingData | None) -> list[str]:
    """Which data the score is on, which data the training curves are of, and a warning
    when they differ in kind (a synthetic run scored on the competition's images)."""
    kind = data_kind(pred.data_dir)
    lines = [f"- Scored on: `{pred.data_dir}`, split `{pred.split}` ({kind} data)"]
    if trained is None:
        return lines + ["- Trained on: not recorded; the training curves are of the run's "
                        "own train and val split"]
    lines.append(f"- Trained on: {trained.describe()}; the training curves are of its "
                 "train and val split")
    if trained.synthetic != (kind == "synthetic"):
        lines.append(f"- **Note**: the training curves' val scores are on {trained.label} "
                     f"data, this report's score on {kind} data: they do not measure the "
                     "same thing.")
    return lines


def report_markdown(pred: Predictions, figures: dict[str, Path],
                    trained: TrainingData | None = None, notes: Sequence[str] = ()) -> str:
    """The text of report.md: numbers, small tables and the figures by relative name;
    ``trained``: what the checkpoint was trained on (its curves' data); ``notes``: more
    warnings about what the score means, one bullet each."""
    numbers = tables.summary(pred)
    table = tables.prediction_table(pred)
    by_length = tables.accuracy_by_length(table)
    by_position = tables.accuracy_by_position(pred.probs, pred.targets)
    mistakes = int((~table["correct"]).sum())
    lines = [
        f"# Error analysis: {pred.checkpoint.name}",
        "",
        f"- Checkpoint: `{pred.checkpoint}`",
        *_data_lines(pred, trained),
        *(f"- **Note**: {note}" for note in notes),
        f"- Images: {numbers['images']:,} ({mistakes:,} read wrong)",
        f"- **Score** (whole string right, as the competition counts): {numbers['score']:.4f}",
        f"- Position accuracy (`position_acc`: each of the {pred.targets.shape[1]} positions' "
        f"class, blank included; not `svhn.score`'s `char_acc`): {numbers['position_acc']:.4f}",
        f"- Digit accuracy (positions holding a digit): {numbers['digit_acc']:.4f}",
        "",
        "## Accuracy by label length",
        "",
        markdown_table(by_length, {"accuracy": ".4f", "images": ","}),
        "",
        "## Accuracy by position",
        "",
        markdown_table(by_position, {"accuracy": ".4f", "digit_accuracy": ".4f",
                                     "digit_slots": ","}),
        "",
    ]
    titles = {
        "accuracy_by_length": "Accuracy by label length",
        "accuracy_by_position": "Accuracy by position",
        "confusion": "Confusion matrix (per position, blank included)",
        "confident_mistakes": "Most confident mistakes",
        "curves": "Training curves" + (f" (trained and validated on {trained.describe()})"
                                       if trained else ""),
        "length_distribution": "Data: label lengths",
        "digit_distribution": "Data: digits",
        "image_sizes": "Data: image sizes",
        "box_geometry": "Data: digit boxes",
        "sample_grid": "Data: sample images",
        "augmentations": "Data: training augmentations",
    }
    lines += ["## Figures", ""]
    for name, path in figures.items():
        lines += [f"### {titles.get(name, name)}", "", f"![{name}]({path.name})", ""]
    return "\n".join(lines)


def write_report(
    checkpoint: str | Path,
    out: str | Path,
    data_dir: str | Path | None = None,
    split: str = "val",
    data_figures: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | None = None,
    n_mistakes: int = 16,
) -> Path:
    """Predict ``split`` with ``checkpoint`` and write figures + report.md into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # checked first: nothing is read or written
        raise OutputExistsError(f"--out {out}: is a file; the report is a folder of figures "
                                "and report.md. Name a folder (made if missing).")
    contents = read_checkpoint(_resolve_path(checkpoint))  # the one time it is opened
    data_dir = _resolve_path(data_dir) if data_dir else data_dir_for_checkpoint(contents)
    cache_dir = Path(cache_dir) if cache_dir else cache_dir_for(data_dir)
    pred = tables.predict_labelled(contents, data_dir, split, cache_dir=cache_dir,
                                   batch_size=batch_size, num_workers=num_workers,
                                   device=device)
    figures = _write_error_figures(pred, out, n_mistakes, contents)
    if data_figures:
        figures |= write_data_figures(data_dir, cache_dir, out)
    report = out / "report.md"
    notes = [note.removeprefix("Note: ") for note in [fold_notice(contents, split)] if note]
    report.write_text(report_markdown(pred, figures, training_data(contents), notes),
                      encoding="utf-8")
    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.report",
        description="Error-analysis figures and report.md for a checkpoint on a labelled split.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to analyse")
    parser.add_argument("--out", required=True, type=Path, help="folder for PNGs + report.md")
    parser.add_argument("--data_dir", default=None,
                        help="competition layout (default: SVHN_DATA_DIR, else the "
                             "checkpoint's data, else data/mchar, else synthetic)")
    parser.add_argument("--split", default="val", choices=tables.LABELLED_SPLITS)
    parser.add_argument("--data_figures", action="store_true",
                        help="also write the data-exploration figures")
    parser.add_argument("--cache_dir", default=None,
                        help="image cache (default: SVHN_CACHE_DIR or data/cache)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    parser.add_argument("--n_mistakes", type=int, default=16,
                        help="confident mistakes to show")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    report = write_report(args.ckpt_path, args.out, args.data_dir, args.split,
                          args.data_figures, args.cache_dir, args.batch_size,
                          args.num_workers, args.device, args.n_mistakes)
    print(f"wrote {report} and its figures")
    return 0
