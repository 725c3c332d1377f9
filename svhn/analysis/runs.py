"""One table of the runs under ``runs/``: ``python -m svhn.runs [RUNS_DIR] [--sort COL] [--json]``.

Each run folder ``runs/<name>/<version>/`` written by ``svhn.fit`` is read without opening
its checkpoints where the files say enough:

- ``config.yaml`` (and ``config_resumed_N.yaml``): backbone, seed, max_epochs, the training
  and validation splits;
- ``metrics.csv``: epochs trained (epochs with a ``val/seq_acc``), the best and the last
  ``val/seq_acc``;
- ``run_summary.json`` (runs from ``svhn.fit`` with this module): the ``--config`` chain,
  how each fit session ended and its training time; without it the time is taken from file
  times (``config.yaml`` written to the last file written) and the column says so;
- ``checkpoints/``: the run's result, the best ``epochNNN-seq_accX.XXXX.ckpt``, or
  ``last.ckpt`` when the validation split was also trained on (``held_out`` no: its
  ``val/seq_acc`` is not a held-out score).

A folder that cannot be read is a row whose ``problems`` say why, never a crash.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from svhn.errors import MissingInputError, OutputExistsError, SettingError, command
from svhn.paths import DATA_DIR, RUNS_DIR
from svhn.run_dir import RunDir
from svhn.tempfiles import write_all_or_none
from svhn.train.run_summary import (
    read_run_summary,
    recorded_seconds,
    training_data_from_record,
    val_is_held_out,
)

__all__ = ["collect_runs", "COLUMNS", "find_run_dirs", "fold_summary", "format_table", "main",
           "read_run", "sort_runs"]

COLUMNS = [
    "run", "backbone", "recipe", "data", "seed", "train_on", "fold", "train_images",
    "generated_images", "unlabelled", "machine",
    "val_held_out", "epochs", "max_epochs", "sessions", "train_seconds", "time_source",
    "best_seq_acc", "best_epoch", "last_seq_acc", "status", "checkpoint", "problems",
]
_FOLD_SPLITS = ("train", "val")  # svhn.data.folds.FOLD_SPLITS (not imported: torch)
_SCORE_COLUMNS = ("best_seq_acc", "last_seq_acc")  # sorted best first
_SORT_ALIASES = {"best": "best_seq_acc", "score": "best_seq_acc", "last": "last_seq_acc",
                "time": "train_seconds", "name": "run"}
_SCORE_IN_NAME = re.compile(r"seq_acc(\d+(?:\.\d+)?)(?:-v\d+)?\.ckpt$")
_VERSION = re.compile(r"^version_(\d+)$")


def find_run_dirs(runs_dir: str | Path) -> list[Path]:
    """``<runs_dir>/<name>/<version>/`` folders holding a run's files, or named version_N."""
    runs_dir = Path(runs_dir)
    found = []
    for name_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        for run_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
            marks = RunDir(run_dir).files
            if _VERSION.match(run_dir.name) or any((run_dir / f).exists() for f in marks):
                found.append(run_dir)
    return sorted(found, key=_run_order)


def _run_order(run_dir: Path) -> tuple[str, int, str]:
    match = _VERSION.match(run_dir.name)
    return run_dir.parent.name, int(match.group(1)) if match else -1, run_dir.name


def collect_runs(runs_dir: str | Path = RUNS_DIR) -> pd.DataFrame:
    """One row per run folder (columns ``COLUMNS``), in name and version order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise MissingInputError(f"{runs_dir}: no such folder (svhn.fit writes its runs under "
                                "runs/ of the folder it is started in).")
    rows = []
    for run_dir in find_run_dirs(runs_dir):
        try:
            rows.append(read_run(run_dir))
        except Exception as err:  # one bad folder must not hide the others
            rows.append({"run": _run_name(run_dir), "status": "unreadable",
                         "problems": f"{type(err).__name__}: {err}"})
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("seed", "epochs", "max_epochs", "sessions", "best_epoch"):
        table[column] = table[column].astype("Int64")
    for column in ("train_seconds", *_SCORE_COLUMNS):
        table[column] = table[column].astype("float64")
    table["val_held_out"] = table["val_held_out"].astype("boolean")
    return table


def _run_name(run_dir: Path) -> str:
    return f"{run_dir.parent.name}/{run_dir.name}"


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run folder as a row; what is missing or unreadable goes into ``problems``."""
    problems: list[str] = []
    row: dict[str, Any] = {"run": _run_name(run_dir)}

    config, n_configs = _read_config(run_dir, problems)
    model, trainer, data = (config.get(k) or {} for k in ("model", "trainer", "data"))
    train_on, val_on = data.get("train_on"), data.get("val_on", "val")
    folds, fold = data.get("folds"), data.get("fold")
    row.update(backbone=model.get("backbone"), seed=config.get("seed_everything"),
               max_epochs=trainer.get("max_epochs"))

    try:
        summary = read_run_summary(run_dir)
    except ValueError as err:
        summary = None
        problems.append(str(err))
    if summary is not None:
        chain = [Path(c).name for c in summary.get("configs") or []]
        row["recipe"] = " + ".join(chain) if chain else "default.yaml"
        train_on = train_on if train_on is not None else summary.get("train_on")
        val_on = data.get("val_on", summary.get("val_on", "val"))
        row["sessions"] = len(summary.get("sessions") or [])
        # images per epoch from the data folder, and the generated ones beside them
        counts = summary.get("train_images") or {}
        row["train_images"] = counts.get("data_dir")
        row["generated_images"] = counts.get("synthetic", counts.get("extra"))
        if folds is None:
            folds, fold = summary.get("folds"), summary.get("fold")
    else:
        row["recipe"] = "not recorded"
        row["sessions"] = n_configs or None
    row["data"] = _data_label(summary, data)
    row["unlabelled"] = _unlabelled_label(summary)
    recorded = (summary or {}).get("machine") or {}
    row["machine"] = f"{recorded['class']}: {recorded['name']}" if recorded else None
    if folds is not None and fold is not None:  # cross-validation: the other folds trained on
        row["fold"] = f"{fold}/{folds}"
        train_on = list(_FOLD_SPLITS)
    else:
        fold = None
    if train_on is not None:
        splits = [train_on] if isinstance(train_on, str) else list(train_on)
        row["train_on"] = "+".join(str(s) for s in splits)
        row["val_held_out"] = val_is_held_out(splits, val_on, fold)

    row.update(_read_metrics(run_dir, problems))
    checkpoints = _read_checkpoints(run_dir, row.get("val_held_out") is not False, problems)
    row["checkpoint"] = checkpoints["checkpoint"]
    if row.get("epochs") is None and checkpoints["last_epoch"] is not None:
        row["epochs"] = checkpoints["last_epoch"] + 1

    row["train_seconds"], row["time_source"] = _train_time(run_dir, summary)
    if summary is not None and n_configs > len(summary.get("sessions") or []):
        # a run resumed (config_resumed_N.yaml) whose first fits predate run_summary.json:
        # their training time is not recorded, so the column says how many fits it counts
        row["time_source"] += f" ({len(summary.get('sessions') or [])} of {n_configs} sessions)"
        row["sessions"] = n_configs
    row["status"] = _status(summary, row.get("epochs"), row.get("max_epochs"))
    row["problems"] = "; ".join(problems)
    return row


def _data_label(summary: dict[str, Any] | None, data: dict[str, Any]) -> str | None:
    """What the run trained on: ``synthetic`` (a generated set, the quick start's fallback
    included) or the data folder's name, ``+extra`` with extra training folders; from
    run_summary.json, else (older runs) from the config where it says (None: unknown)."""
    record = (summary or {}).get("data")
    recorded = training_data_from_record(record)
    if recorded is not None:
        return recorded.label + ("+extra" if record.get("extra_train") else "")
    extra = "+extra" if data.get("extra_train") or data.get("synthetic_extra") else ""
    if data.get("data_dir"):
        return Path(str(data["data_dir"])).name + extra
    if data and not data.get("synthetic_fallback"):
        return DATA_DIR.name + extra  # the default data/mchar, with no fallback to synthetic
    return None  # the quick start's default: data/mchar or its synthetic fallback


def _unlabelled_label(summary: dict[str, Any] | None) -> str | None:
    """The images without labels a run learnt from (``--data.unlabelled``), and how many."""
    record = ((summary or {}).get("data") or {}).get("unlabelled")
    if not isinstance(record, dict):
        return None
    return f"{record.get('source')} ({record.get('images', '?')} images)"


def _read_config(run_dir: Path, problems: list[str]) -> tuple[dict[str, Any], int]:
    """The newest readable of config.yaml, config_resumed_1.yaml, ... (a resume may change
    max_epochs) and how many there are."""
    run = RunDir(run_dir)
    paths = [run.config, *run.resumed_configs()]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        problems.append("no config.yaml")
        return {}, 0
    for path in reversed(paths):
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            problems.append(f"{path.name} unreadable ({_first_line(err)})")
            continue
        if isinstance(config, dict):
            return config, len(paths)
        problems.append(f"{path.name} is not a mapping")
    return {}, len(paths)


def _read_metrics(run_dir: Path, problems: list[str]) -> dict[str, Any]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        problems.append("no metrics.csv")
        return {}
    try:
        metrics = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        problems.append(f"metrics.csv unreadable ({_first_line(err)})")
        return {}
    if "val/seq_acc" not in metrics or "epoch" not in metrics \
            or metrics["val/seq_acc"].notna().sum() == 0:
        problems.append("no val/seq_acc yet")
        return {"epochs": 0}
    val = metrics.loc[metrics["val/seq_acc"].notna(), ["epoch", "val/seq_acc"]]
    val = val.dropna().astype({"epoch": int})
    per_epoch = val.groupby("epoch")["val/seq_acc"].last()  # a resumed epoch: its last score
    best_epoch = int(per_epoch.idxmax())
    return {"epochs": int(per_epoch.index.max()) + 1, "best_seq_acc": float(per_epoch.max()),
            "best_epoch": best_epoch, "last_seq_acc": float(per_epoch.iloc[-1])}


def _read_checkpoints(run_dir: Path, held_out: bool, problems: list[str]) -> dict[str, Any]:
    run = RunDir(run_dir)
    folder, last = run.checkpoints, run.last_checkpoint
    files = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    scored = [(float(m.group(1)), p.stat().st_mtime, p) for p in files
              if (m := _SCORE_IN_NAME.search(p.name))]
    best = max(scored)[2] if scored else None
    result: dict[str, Any] = {"checkpoint": None, "last_epoch": None}
    if not files:
        problems.append("no checkpoint yet")
        return result
    if held_out and best is not None:
        result["checkpoint"] = str(best)
    elif last.is_file():
        result["checkpoint"] = str(last)
    else:
        problems.append("no last.ckpt" if not held_out else "no best checkpoint")
    if last.is_file() and not run.metrics.is_file():
        from svhn.checkpoint_format import CheckpointError, read_checkpoint

        try:  # no metrics (e.g. a W&B run): the epoch count is in the checkpoint
            epoch = read_checkpoint(last).epoch
            result["last_epoch"] = int(epoch) if epoch is not None else None
        except CheckpointError as err:
            problems.append(str(err))
    return result


def _train_time(run_dir: Path, summary: dict[str, Any] | None) -> tuple[float, str]:
    """Training seconds and where they come from: recorded by the fit, or file times."""
    end = _last_written(run_dir)
    if summary and summary.get("sessions"):
        seconds = recorded_seconds(summary)
        open_session = summary["sessions"][-1]
        if open_session.get("seconds") is None:  # still running, or killed
            started = open_session.get("started_unix")
            if started is None or end is None:
                return seconds, "recorded (last session unfinished)"
            return seconds + max(0.0, end - float(started)), "recorded + files (unfinished)"
        return seconds, "recorded"
    run = RunDir(run_dir)
    start = run.config
    if end is None or not start.is_file():
        return math.nan, "-"
    source = "files" + (" (spans resumes)" if run.resumed_configs() else "")
    return max(0.0, end - start.stat().st_mtime), source


def _last_written(run_dir: Path) -> float | None:
    run = RunDir(run_dir)
    files = [run.metrics, *run.checkpoints.glob("*.ckpt")]
    times = [p.stat().st_mtime for p in files if p.is_file()]
    return max(times) if times else None


def _status(summary: dict[str, Any] | None, epochs: int | None, max_epochs: int | None) -> str:
    if summary and summary.get("sessions"):
        return str(summary["sessions"][-1].get("status") or "-")
    if epochs is not None and max_epochs is not None and epochs >= max_epochs:
        return "finished"
    return "unknown"  # no run_summary.json: killed, stopped early or still running


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# -- the command line ---------------------------------------------------------------------
def sort_runs(table: pd.DataFrame, column: str, reverse: bool = False) -> pd.DataFrame:
    """Scores best first, everything else ascending; ``reverse`` flips; blanks last.

    By a score, runs whose validation split was held out come first: a score measured on
    images the run trained on does not rank against held-out ones.
    """
    column = _SORT_ALIASES.get(column, column)
    if column not in table.columns:
        raise SettingError(f"--sort {column}: no such column; one of {', '.join(COLUMNS)}")
    ascending = (column not in _SCORE_COLUMNS) != reverse
    table = table.sort_values(column, ascending=ascending, na_position="last", kind="stable")
    if column in _SCORE_COLUMNS:
        trained_on_val = table["val_held_out"].eq(False).fillna(False)
        table = pd.concat([table[~trained_on_val], table[trained_on_val]])
    return table


# What the default table leaves out, to stay within a terminal's width (--wide: all).
_WIDE_ONLY = ("backbone", "train_on", "time_from", "checkpoint")


def format_table(table: pd.DataFrame, wide: bool = False) -> str:
    """The table for a terminal, with a legend for what needs one; ``wide``: every column
    (the backbone, data, splits, where the time came from and the result checkpoint)."""
    shown = pd.DataFrame({
        "run": table["run"],
        "backbone": table["backbone"].fillna("-"),
        "recipe": table["recipe"].fillna("-"),
        "data": table["data"].fillna("-"),
        "seed": table["seed"].map(_int_text),
        "train_on": table["train_on"].fillna("-"),
        "fold": table["fold"].fillna("-"),
        "images": table["train_images"].map(_int_text),
        "generated": table["generated_images"].map(_int_text),
        "unlabelled": table["unlabelled"].fillna("-"),
        "held_out": table["val_held_out"].map(
            lambda v: "-" if pd.isna(v) else ("yes" if v else "NO")),
        "epochs": [f"{_int_text(e)}/{_int_text(m)}"
                   for e, m in zip(table["epochs"], table["max_epochs"])],
        "time": table["train_seconds"].map(
            lambda s: "-" if pd.isna(s) else f"{s:,.0f} s"),
        "time_from": table["time_source"].fillna("-"),
        "best_val": table["best_seq_acc"].map(_score_text),
        "at_epoch": table["best_epoch"].map(_int_text),
        "last_val": table["last_seq_acc"].map(_score_text),
        "status": table["status"].fillna("-"),
        "checkpoint": table["checkpoint"].fillna("-"),
    })
    if not wide:
        shown = shown.drop(columns=list(_WIDE_ONLY))
    if not table["fold"].notna().any():
        shown = shown.drop(columns="fold")  # no cross-validation run among them
    if not table["generated_images"].fillna(0).astype(bool).any():
        shown = shown.drop(columns="generated")  # no run trained on generated images
    if not table["unlabelled"].notna().any():
        shown = shown.drop(columns="unlabelled")  # no run learnt from unlabelled images
    if table["problems"].fillna("").astype(bool).any():
        shown["problems"] = table["problems"].fillna("")
    lines = [shown.to_string(index=False)]
    folds = fold_summary(table)
    for summary in folds.itertuples(index=False):
        lines.append(_fold_line(summary))
    if not folds.empty:
        lines.append("folds: best_val (the held-out fold's score) mean ± std (sample, n - 1) "
                     "over the folds found of each run name, the newest run of each fold.")
    if table["val_held_out"].eq(False).fillna(False).any():
        lines.append("held_out NO: the run trained on its validation split, so its val scores "
                     "are not held-out scores; its checkpoint is last.ckpt (the last epoch).")
    lines.append("images: real training images per epoch from the data folder; generated: "
                 "generated (synthetic) images beside them; epochs: trained/max_epochs; "
                 "at_epoch: epoch of best_val (from 0)."
                 + (" time_from: recorded = fit start to end (run_summary.json), files = "
                    "config.yaml to the last file written; data: synthetic (a generated set) "
                    "or the data folder's name (+extra: extra training folders), - not "
                    "recorded." if wide else " --wide: every column (backbone, train_on, "
                    "checkpoint, ...)."))
    return "\n".join(lines)


def fold_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run name and fold count of the cross-validation runs in ``table``:
    ``name``, ``folds``, ``found`` (fold indices with a score, the newest run of each fold),
    ``missing`` (indices without one), ``mean`` and ``std`` (sample) of their best_seq_acc
    (the held-out fold's score; std NaN for a single fold)."""
    columns = ["name", "folds", "found", "missing", "mean", "std"]
    rows = []
    with_fold = table[table["fold"].notna()] if "fold" in table else table.iloc[0:0]
    # (name, folds) -> fold index -> (version, score) of the newest run of that fold
    groups: dict[tuple[str, int], dict[int, tuple[int, float]]] = {}
    for run, fold, score in zip(with_fold["run"], with_fold["fold"], with_fold["best_seq_acc"]):
        index, folds = (int(n) for n in str(fold).split("/"))
        newest = groups.setdefault((run.split("/")[0], folds), {})
        version = _version_of(run)
        if index not in newest or version >= newest[index][0]:
            newest[index] = (version, score)
    for (name, folds), newest in sorted(groups.items()):
        scores = {i: s for i, (_, s) in sorted(newest.items()) if pd.notna(s)}
        values = pd.Series(list(scores.values()), dtype="float64")
        rows.append({"name": name, "folds": folds, "found": list(scores),
                     "missing": [i for i in range(folds) if i not in scores],
                     "mean": values.mean() if len(values) else math.nan,
                     "std": values.std(ddof=1) if len(values) > 1 else math.nan})
    return pd.DataFrame(rows, columns=columns)


def _version_of(run: str) -> int:
    match = _VERSION.match(run.split("/")[-1])
    return int(match.group(1)) if match else -1


def _fold_line(summary) -> str:
    """``folds NAME (K): best_val MEAN ± STD over folds 0, 1, ...[; missing ...]``."""
    found = ", ".join(map(str, summary.found)) or "none"
    if not summary.found:
        score = "no scores yet"
    elif len(summary.found) == 1:
        score = f"best_val {summary.mean:.4f} (one fold: no spread)"
    else:
        score = f"best_val {summary.mean:.4f} ± {summary.std:.4f}"
    missing = f"; missing {', '.join(map(str, summary.missing))}" if summary.missing else ""
    return (f"folds {summary.name} ({summary.folds} folds): {score} over folds "
            f"{found}{missing}")


def _int_text(value) -> str:
    return "-" if value is None or pd.isna(value) else str(int(value))


def _score_text(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{float(value):.4f}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m svhn.runs",
        description="One table of the training runs under RUNS_DIR (runs/<name>/<version>/).")
    parser.add_argument("runs_dir", nargs="?", default=str(RUNS_DIR), help="default: runs")
    parser.add_argument("--sort", metavar="COLUMN",
                        help=f"one of {', '.join(COLUMNS)} (or best, last, time); scores sort "
                             "best first (runs that trained on val after the others), the rest "
                             "ascending")
    parser.add_argument("--reverse", action="store_true", help="flip the sort order")
    parser.add_argument("--name", metavar="PATTERN",
                        help="only runs whose name matches (shell pattern, e.g. 'resnet*')")
    parser.add_argument("--json", action="store_true",
                        help="every column as a JSON list of objects")
    parser.add_argument("--wide", action="store_true",
                        help="every column in the table (default: the ones that fit a "
                             "terminal; backbone, train_on, time_from and checkpoint are "
                             "left out)")
    parser.add_argument("--csv", metavar="FILE",
                        help="also write every column, the machine each run trained on "
                             "included, as a CSV file (a result file; never over one)")
    parser.add_argument("--efficiency", metavar="PNG",
                        help="also draw best and last val/seq_acc against the number of "
                             "training images of the runs listed (e.g. --name 'real_cpu*' "
                             "over runs with different --data.train_subset) into PNG")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.csv and Path(args.csv).exists():
        raise OutputExistsError(f"{args.csv}: exists; svhn.runs never writes over a file. "
                                "Name a new one.")
    table = collect_runs(args.runs_dir)
    if args.name:
        names = table["run"].str.split("/").str[0]
        table = table[[fnmatch.fnmatch(n, args.name) for n in names]]
    if args.sort:
        table = sort_runs(table, args.sort, args.reverse)
    elif args.reverse:
        table = table.iloc[::-1]
    for run, problems in zip(table["run"], table["problems"].fillna("")):
        if problems:
            print(f"svhn.runs: {run}: {problems}", file=sys.stderr)
    if args.csv:  # never over a file, even one written since the check above
        write_all_or_none({Path(args.csv): lambda tmp: table.to_csv(tmp, index=False)},
                          overwrite=False)
    if args.efficiency:
        from svhn.analysis.plots import data_efficiency, save

        save(data_efficiency(table), args.efficiency)
        print(f"Data efficiency: {args.efficiency}", file=sys.stderr, flush=True)
    if args.json:
        text = json.dumps(json.loads(table.to_json(orient="records")), indent=2)
    elif table.empty:
        text = (f"No runs under {args.runs_dir}" + (f" named {args.name}" if args.name else "")
                + " (python -m svhn.fit writes them there).")
    else:
        text = format_table(table, wide=args.wide)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. piped into head: the rest goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
