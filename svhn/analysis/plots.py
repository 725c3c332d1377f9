"""Matplotlib figures for the data exploration and the error analysis.

Every function takes tables or examples from ``svhn.analysis`` and returns a Figure drawn on
an Agg canvas, without pyplot: nothing global changes, it works headless, and a notebook
shows the returned figure inline (``%matplotlib inline``). ``save`` writes a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter, ScalarFormatter

from svhn.analysis.tables import (
    CLASS_NAMES,
    AugmentedExample,
    Example,
    Mistake,
    epoch_end_step,
    metric_curve,
)
from svhn.data.labels import BLANK
from svhn.errors import SettingError

__all__ = ["accuracy_by_length", "accuracy_by_position", "augmentation_grid", "box_geometry",
           "confident_mistakes", "confusion", "data_efficiency", "digit_distribution",
           "image_sizes", "length_distribution", "new_figure", "sample_grid", "save",
           "training_curves"]

_SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test_a": "tab:green"}
_BOX_COLOUR = "#ffd400"  # yellow reads on dark and light house-number plates alike
_DIGIT_BOX_COLOUR = "#00e5ff"
_SHORT_CLASS_NAMES = [str(d) for d in range(10)] + ["–"]


def new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas with constrained (tight, automatic) layout."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``figure`` as a PNG (folders created as needed) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, facecolor="white")
    return path


def _split_colour(split: str) -> str:
    return _SPLIT_COLOURS.get(split, "tab:gray")


def _grouped_bars(ax, shares: pd.DataFrame, counts: pd.DataFrame) -> None:
    """Bars per row of ``shares`` grouped by column (split), with counts written on top."""
    n_groups = len(shares.columns)
    width = 0.8 / n_groups
    x = np.arange(len(shares.index))
    for i, split in enumerate(shares.columns):
        offset = (i - (n_groups - 1) / 2) * width
        bars = ax.bar(x + offset, shares[split], width, label=split, color=_split_colour(split))
        ax.bar_label(bars, labels=[f"{c:,}" for c in counts[split]], fontsize=7, padding=1)
    ax.set_xticks(x, [str(v) for v in shares.index])
    ax.legend(title="split")
    ax.margins(y=0.12)


# --------------------------------------------------------------------------- data figures


def length_distribution(counts: pd.DataFrame) -> Figure:
    """Share of images per label length and split (``analysis.length_counts``)."""
    figure = new_figure(6.5, 3.8)
    ax = figure.add_subplot()
    _grouped_bars(ax, counts / counts.sum() * 100, counts)
    ax.set_title("Label length (numbers on bars: image counts)")
    ax.set_xlabel("digits in the label")
    ax.set_ylabel("share of the split's images (%)")
    return figure


def digit_distribution(counts: pd.DataFrame, by_position: pd.DataFrame) -> Figure:
    """Digit frequency per split, and which digits stand at which position.

    ``counts`` from ``analysis.digit_counts``, ``by_position`` from
    ``analysis.digit_position_counts``.
    """
    figure = new_figure(12, 4.2)
    left, right = figure.subplots(1, 2, width_ratios=[1.6, 1])
    _grouped_bars(left, counts / counts.sum() * 100, counts)
    left.set_title("Digit frequency (numbers on bars: counts)")
    left.set_xlabel("digit")
    left.set_ylabel("share of the split's digits (%)")

    shares = by_position / by_position.sum() * 100
    image = right.imshow(shares.to_numpy(), cmap="Blues", aspect="auto", vmin=0)
    for (row, col), value in np.ndenumerate(by_position.to_numpy()):
        colour = "white" if shares.iat[row, col] > shares.to_numpy().max() * 0.6 else "black"
        right.text(col, row, f"{value:,}", ha="center", va="center", fontsize=8, color=colour)
    right.set_xticks(range(len(shares.columns)), [str(c) for c in shares.columns])
    right.set_yticks(range(10), [str(d) for d in range(10)])
    right.set_title("Digit by position (all splits)")
    right.set_xlabel("position from the left")
    right.set_ylabel("digit")
    figure.colorbar(image, ax=right, label="share of the position's digits (%)")
    return figure


def _log_bins(values: pd.Series, n: int = 25) -> np.ndarray:
    """Log-spaced bin edges between whole pixels: sizes are integers, and bins narrower
    than a pixel would alternate between empty and full."""
    low, high = max(float(values.min()), 1.0), max(float(values.max()), 2.0)
    return np.unique(np.round(np.geomspace(low, high + 1, n))) - 0.5


def _split_histograms(ax, table: pd.DataFrame, column: str, bins) -> None:
    """One outline histogram per split, as a share of that split's images."""
    for split, rows in table.groupby("split", sort=False):
        weights = np.full(len(rows), 100 / len(rows))
        ax.hist(rows[column], bins=bins, weights=weights, histtype="step", linewidth=1.6,
                label=f"{split} (median {rows[column].median():.3g})",
                color=_split_colour(split))
    ax.set_ylabel("share of the split's images (%)")
    ax.legend(fontsize=8)


def image_sizes(table: pd.DataFrame) -> Figure:
    """Image width and height per split, and width against height (``sample_table``)."""
    figure = new_figure(13, 3.8)
    width_ax, height_ax, scatter_ax = figure.subplots(1, 3)
    for ax, column in ((width_ax, "width"), (height_ax, "height")):
        _split_histograms(ax, table, column, _log_bins(table[column]))
        ax.set_xscale("log")
        ax.set_title(f"Image {column}")
        ax.set_xlabel(f"{column} (pixels, log scale)")
    for split, rows in table.groupby("split", sort=False):
        scatter_ax.scatter(rows["width"], rows["height"], s=4, alpha=0.35, label=split,
                           color=_split_colour(split))
    scatter_ax.set_xscale("log")
    scatter_ax.set_yscale("log")
    scatter_ax.set_title("Width against height")
    scatter_ax.set_xlabel("width (pixels)")
    scatter_ax.set_ylabel("height (pixels)")
    scatter_ax.legend(markerscale=3)
    return figure


def box_geometry(table: pd.DataFrame) -> Figure:
    """Where the digits are and how much of the image they fill (``sample_table``)."""
    figure = new_figure(11, 8)
    (w_ax, h_ax), (centre_ax, digit_ax) = figure.subplots(2, 2)
    fraction_bins = np.linspace(0, 1, 26)
    _split_histograms(w_ax, table, "box_w", fraction_bins)
    w_ax.set_title("Width of the digits' union box")
    w_ax.set_xlabel("box width / image width")
    _split_histograms(h_ax, table, "box_h", fraction_bins)
    h_ax.set_title("Height of the digits' union box")
    h_ax.set_xlabel("box height / image height")

    for split, rows in table.groupby("split", sort=False):
        centre_ax.scatter(rows["box_cx"], rows["box_cy"], s=4, alpha=0.3, label=split,
                          color=_split_colour(split))
    centre_ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, linestyle="--", color="gray"))
    centre_ax.set_xlim(-0.05, 1.05)
    centre_ax.set_ylim(1.05, -0.05)  # image coordinates: y grows downwards
    centre_ax.set_aspect("equal")
    centre_ax.set_title("Centre of the union box (dashed: image frame)")
    centre_ax.set_xlabel("x / image width")
    centre_ax.set_ylabel("y / image height")
    centre_ax.legend(markerscale=3)

    _split_histograms(digit_ax, table, "digit_h", _log_bins(table["digit_h"]))
    digit_ax.set_xscale("log")
    digit_ax.set_title("Digit height in the original image")
    digit_ax.set_xlabel("mean digit box height (pixels, log scale)")
    return figure


def _draw_digit_boxes(ax, example: Example) -> None:
    for digit, (left, top, width, height) in zip(example.label, example.boxes):
        ax.add_patch(Rectangle((left, top), width, height, fill=False, linewidth=1.2,
                               edgecolor=_DIGIT_BOX_COLOUR))
        ax.text(left, top, digit, color="black", fontsize=7, va="bottom",
                bbox={"facecolor": _DIGIT_BOX_COLOUR, "pad": 0.5, "linewidth": 0})


def sample_grid(examples: Sequence[Example], columns: int = 4) -> Figure:
    """Images with each digit's box and label (``analysis.load_examples``)."""
    rows = max(1, -(-len(examples) // columns))
    figure = new_figure(3.2 * columns, 2.2 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, example in zip(axes, examples):
        ax.imshow(example.image)
        _draw_digit_boxes(ax, example)
        height, width = example.image.shape[:2]
        ax.set_title(f"{example.label}   ({width}×{height} px)", fontsize=10)
    figure.suptitle("Sample images with their labelled digit boxes", fontsize=13)
    return figure


def _draw_normalised_box(ax, image: np.ndarray, box: Sequence[float]) -> None:
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0 * width, y0 * height), (x1 - x0) * width, (y1 - y0) * height,
                           fill=False, linewidth=1.5, edgecolor=_BOX_COLOUR))


def augmentation_grid(examples: Sequence[AugmentedExample],
                      boxes_for: Sequence[str] = ("zoom",)) -> Figure:
    """Per image and preset: the plain input, then several random training draws.

    The union box (yellow) is drawn for the presets in ``boxes_for``, and on the plain input.
    """
    presets = list(examples[0].draws) if examples else []
    n_draws = max((len(d) for e in examples for d in e.draws.values()), default=0)
    rows, columns = len(examples) * len(presets), n_draws + 1
    figure = new_figure(2.3 * columns, 1.2 * rows + 0.6)
    axes = np.asarray(figure.subplots(rows, columns, squeeze=False))
    for i, example in enumerate(examples):
        for j, preset in enumerate(presets):
            row = axes[i * len(presets) + j]
            original, box = example.original
            row[0].imshow(original)
            _draw_normalised_box(row[0], original, box)
            row[0].set_ylabel(f"{example.label}\n{preset}", fontsize=10, rotation=0,
                              ha="right", va="center")
            for ax, (image, box) in zip(row[1:], example.draws[preset]):
                ax.imshow(image)
                if preset in boxes_for:
                    _draw_normalised_box(ax, image, box)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("input (preset none)", fontsize=10)
    for k in range(1, columns):
        axes[0, k].set_title(f"draw {k}", fontsize=10)
    figure.suptitle("Training augmentations: label and preset on the left", fontsize=13)
    return figure


# --------------------------------------------------------------------------- error figures


def confusion(matrix: np.ndarray) -> Figure:
    """Per-position confusion (``analysis.confusion_matrix``): colour is the share of the
    true class's row, the number the count; the blank class is labelled "blank"."""
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = new_figure(8, 7)
    ax = figure.add_subplot()
    image = ax.imshow(row_share, cmap="Blues", norm=Normalize(0, 1))
    for (row, col), count in np.ndenumerate(matrix):
        if count == 0:
            continue
        colour = "white" if row_share[row, col] > 0.55 else "black"
        ax.text(col, row, f"{count:,}", ha="center", va="center", fontsize=8, color=colour)
    ticks = range(len(CLASS_NAMES))
    ax.set_xticks(ticks, CLASS_NAMES)
    ax.set_yticks(ticks, [f"{name} ({n:,})" for name, n in zip(CLASS_NAMES, matrix.sum(1))])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (positions)")
    ax.set_title(f"Confusion over all positions ({int(matrix.sum()):,} positions)")
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return figure


def accuracy_by_length(by_length: pd.DataFrame, score: float | None = None,
                       scored_on: str | None = None) -> Figure:
    """Whole-string accuracy per label length (``analysis.accuracy_by_length``);
    ``scored_on`` names the images scored (e.g. ``competition val (data/mchar)``)."""
    figure = new_figure(6.5, 3.8)
    ax = figure.add_subplot()
    ticks = [f"{length}\n{n:,} images" for length, n in
             zip(by_length["length"], by_length["images"])]
    bars = ax.bar(ticks, by_length["accuracy"], color="tab:blue")
    ax.bar_label(bars, fmt="{:.1%}", fontsize=9)
    if score is not None:
        ax.axhline(score, color="tab:red", linestyle="--", linewidth=1,
                   label=f"all images: {score:.1%}")
        ax.legend(loc="upper right")
    ax.set_ylim(0, 1.15)
    ax.set_title("Whole-string accuracy by label length"
                 + (f"\non {scored_on}" if scored_on else ""))
    ax.set_xlabel("digits in the true label")
    ax.set_ylabel("accuracy")
    return figure


def data_efficiency(runs: pd.DataFrame) -> Figure:
    """Best and last val/seq_acc against training images per run (``svhn.runs`` rows with
    ``train_images``), on a log axis: how the recipe grows with more labelled data."""
    points = runs.dropna(subset=["train_images", "best_seq_acc"]).sort_values("train_images")
    if points.empty:
        raise SettingError("no run with a recorded number of training images and a val score "
                         "(runs from svhn.fit record it in run_summary.json).")
    figure = new_figure(6.5, 4)
    ax = figure.add_subplot()
    for column, style, label in (("best_seq_acc", "o-", "best epoch (chosen on val)"),
                                 ("last_seq_acc", "s--", "last epoch")):
        ax.plot(points["train_images"], points[column], style, label=label)
    for images, score in zip(points["train_images"], points["best_seq_acc"]):
        ax.annotate(f"{score:.3f}", (images, score), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=9)
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(points["train_images"])))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("val whole-string accuracy")
    ax.set_title("Data efficiency")
    ax.legend(loc="lower right")
    return figure


def accuracy_by_position(by_position: pd.DataFrame) -> Figure:
    """Per-position accuracy over all images and over images with a digit there."""
    figure = new_figure(7.5, 4)
    ax = figure.add_subplot()
    x = np.arange(len(by_position))
    width = 0.38
    every = ax.bar(x - width / 2, by_position["accuracy"], width, color="tab:gray",
                   label="all images (blank is a class)")
    digits = ax.bar(x + width / 2, by_position["digit_accuracy"].fillna(0), width,
                    color="tab:blue", label="images with a digit there")
    ax.bar_label(every, fmt="{:.1%}", fontsize=8)
    ax.bar_label(digits, labels=[f"{a:.1%}" if n else "" for a, n in
                                 zip(by_position["digit_accuracy"],
                                     by_position["digit_slots"])], fontsize=8)
    ax.set_xticks(x, [f"{p}\n{n:,} with a digit" for p, n in
                      zip(by_position["position"], by_position["digit_slots"])])
    ax.set_ylim(0, 1.2)
    ax.set_title("Accuracy by position")
    ax.set_xlabel("position from the left")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    return figure


def _probability_panel(ax, mistake: Mistake) -> None:
    """Positions (rows) x classes (columns); red outlines mark the true classes."""
    ax.imshow(mistake.probs, cmap="Greys", norm=Normalize(0, 1), aspect="auto")
    for position, target in enumerate(mistake.target):
        ax.add_patch(Rectangle((target - 0.5, position - 0.5), 1, 1, fill=False,
                               edgecolor="tab:red", linewidth=1.5))
    ax.set_xticks(range(len(_SHORT_CLASS_NAMES)), _SHORT_CLASS_NAMES, fontsize=7)
    ax.set_xlabel("class", fontsize=7, labelpad=1)
    ax.set_yticks(range(len(mistake.target)), [str(p + 1) for p in range(len(mistake.target))],
                  fontsize=7)
    ax.tick_params(length=0, pad=1)
    ax.set_ylabel("position", fontsize=7)


def confident_mistakes(mistakes: Sequence[Mistake], columns: int = 4) -> Figure:
    """Wrong readings the model was surest of: image, truth, prediction, probabilities."""
    if not mistakes:
        return _message_figure("No mistakes on this split.", "Most confident mistakes")
    rows = -(-len(mistakes) // columns)
    figure = new_figure(3.3 * columns, 3.0 * rows + 0.7)
    cells = np.atleast_1d(figure.subfigures(rows, columns)).ravel()
    for cell, mistake in zip(cells, mistakes):
        image_ax, prob_ax = cell.subplots(2, 1, height_ratios=[1.4, 1])
        image_ax.imshow(mistake.image)
        image_ax.set_axis_off()
        image_ax.set_title(f"true {mistake.truth}  →  read {mistake.prediction}\n"
                           f"confidence {mistake.confidence:.2f}", fontsize=9)
        _probability_panel(prob_ax, mistake)
    figure.suptitle("Most confident mistakes (grey: probability per position and class, "
                    f"red: true class, {_SHORT_CLASS_NAMES[BLANK]} = blank)", fontsize=12)
    return figure


def _message_figure(message: str, title: str) -> Figure:
    figure = new_figure(6, 2.5)
    ax = figure.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, wrap=True)
    ax.set_axis_off()
    ax.set_title(title)
    return figure


def _plot_curves(ax, metrics: pd.DataFrame, columns: Sequence[str],
                 data_label: str | None = None) -> bool:
    drawn = False
    for column in columns:
        curve = metric_curve(metrics, column)
        if curve.empty:
            continue
        style = {"marker": "o", "markersize": 4} if column.startswith("val/") else {}
        split = column.split("/")[0] if "/" in column else ""
        label = f"{column} ({data_label} {split})" if data_label and split else column
        ax.plot(curve["step"], curve[column], label=label, linewidth=1.4, **style)
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return drawn


def training_curves(metrics: pd.DataFrame | None, checkpoint_epoch: int | None = None,
                    trained_on: str | None = None, data_label: str | None = None) -> Figure:
    """Loss, accuracies and learning rate against the training step (a CSVLogger run).

    A dotted line marks where the checkpoint of ``checkpoint_epoch`` was taken.
    ``trained_on`` (the run's data, in the title) and ``data_label`` (short, e.g.
    ``synthetic``: in the legend beside each train/ and val/ curve) say which data the
    curves are of.
    """
    if metrics is None or "step" not in metrics:
        return _message_figure("No metrics.csv in this checkpoint's run folder.",
                               "Training curves")
    lr_columns = [c for c in metrics.columns if c.startswith("lr")]
    panels = [
        ("Loss", "loss", ["train/loss", "val/loss"]),
        ("Accuracy", "accuracy", ["train/seq_acc", "val/seq_acc", "val/position_acc"]),
    ]
    if lr_columns:
        panels.append(("Learning rate", "learning rate", lr_columns))
    checkpoint_step = epoch_end_step(metrics, checkpoint_epoch)
    figure = new_figure(5 * len(panels), 3.8)
    for ax, (title, ylabel, columns) in zip(figure.subplots(1, len(panels)), panels):
        if not _plot_curves(ax, metrics, columns, data_label):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if checkpoint_step is not None:
            ax.axvline(checkpoint_step, color="black", linestyle=":", linewidth=1.2,
                       label=f"checkpoint (epoch {checkpoint_epoch})")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
    if "epoch" in metrics:
        epochs = int(metrics["epoch"].max()) + 1 if metrics["epoch"].notna().any() else 0
        data = f": trained and validated on {trained_on}" if trained_on else ""
        figure.suptitle(f"Training curves ({epochs} epoch{'s' if epochs != 1 else ''}){data}")
    return figure
