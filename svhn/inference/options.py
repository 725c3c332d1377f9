"""The command-line options every reading command shares (``svhn.predict``, ``svhn.read``):
the precision, the test-time views and the reader settings a reading may override."""

from __future__ import annotations

import argparse

from svhn.inference.predictor import PRECISIONS
from svhn.inference.views import TTA_VIEWS
from svhn.model.reader import SEARCH_GATE
from svhn.precision import AUTO

__all__ = ["add_reader_options", "reader_overrides"]


def add_reader_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds --precision, --tta and the reader settings group (returned: its flags go to
    ``load_reader`` by name through ``reader_overrides``)."""
    parser.add_argument("--precision", default=None, choices=(*PRECISIONS, AUTO),
                        help="default: the precision each checkpoint was validated in (the "
                             "score in its name). bf16-mixed: several times faster with "
                             "--channels_last on CPUs with AMX or AVX512-BF16 and on recent "
                             "GPUs, many times slower on other CPUs; 16-mixed: GPUs; auto: "
                             "the fastest this machine has")
    # The reader's saved settings a reading may override: every flag of this group goes
    # to load_reader by its name (None: as trained), so a new one is added here only.
    reader = parser.add_argument_group("reader settings (default: as the checkpoint was trained)")
    reader.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                        help="memory format for the convolutions (default: as trained)")
    reader.add_argument("--zoom_search", action=argparse.BooleanOptionalAction, default=None,
                        help="start zoom chains from a grid of windows too and take the "
                             "reading most of them agree on (default: as trained; on in "
                             "configs/real_cpu.yaml). Up to 29x the crop reads, spent where "
                             "the first two chains are unsure (see --search_gate)")
    gate = reader.add_mutually_exclusive_group()
    gate.add_argument("--search_gate", type=float, default=None,
                      help="run the search's 27 window chains where the first two chains "
                           "disagree or the first's confidence is below this (default: as "
                           f"trained, {SEARCH_GATE} for checkpoints that do not say; 1 = "
                           "every image)")
    gate.add_argument("--full_search", action="store_true",
                      help="search every image (--search_gate 1): slower, the reference "
                           "the gate is measured against")
    reader.add_argument("--search_majority", type=float, default=None,
                        help="search in two steps: the 9 middle-size windows first, the "
                             "other 18 only where the vote then holds no reading with this "
                             "share of its support (default: as trained; 0.5 in "
                             "configs/real_cpu.yaml)")
    reader.add_argument("--search_merge", type=float, default=None,
                        help="in the gated search, do not read again a crop that overlaps "
                             "one read already by this IoU (default: as trained; "
                             "configs/real_cpu.yaml sets it)")
    parser.add_argument("--tta", action="store_true",
                        help=f"also read the views {', '.join(TTA_VIEWS)} (averaged; "
                             "with the zoom search, every view's chains vote together)")
    return reader


def reader_overrides(args: argparse.Namespace, reader: argparse._ArgumentGroup) -> dict:
    """The reader settings given, by ``load_reader``'s names (None: as trained)."""
    overrides = {action.dest: getattr(args, action.dest) for action in reader._group_actions}
    if overrides.pop("full_search"):
        overrides["search_gate"] = 1.0
    return overrides
