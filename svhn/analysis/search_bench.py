"""The gated zoom search against the full one, on a labelled split:
``python -m svhn.bench --search CKPT [CKPT ...] --data_dir DIR [--split val]``.

Each checkpoint reads the split through ``svhn.predict``'s path (``Trainer.predict``,
the checkpoint's precision and, unless ``--batch_size`` says otherwise, svhn.predict's
batch; the image cache built beforehand, one warm-up batch first), in two timed passes,
each repeated ``--repeats`` times (alternating, so a drift in the
machine's speed hits both; each pass's median time kept): the full search (every image's 29
chains) and the gated one (the window chains only where the first two chains disagree or
the first is less confident than the gate: ``DigitReader.unsure``). The full pass also yields
the score of any other gate exactly: an image's search does not depend on the other images,
and its first chain is chain 0 of its search. So the sweep of gates costs no more passes,
and the gated pass's own score checks that claim.

For each gate the report says the share of images searched, the whole-string score, its
difference from the full search's, and where the gate matters: the images it did not search
whose answer the full search would have changed, and who had them right. With
``--search_majority`` (the two-step search, ``DigitReader.search_majority``) the sweep and the
gated pass search in two steps, and the report also says the share of images that went on
to all 27 windows. With ``--search_merge`` the gated pass also merges chains that found the
same box (``DigitReader.search_merge``): the sweep cannot replay that (it changes which
crops are read), so the gated pass's own score is the measure, with the images whose
answer it changed from the full pass's (and who had them right). Each pass also counts its
crop reads per image (the whole image's read included): the work the gate saves, whatever
the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from svhn.checkpoint_format import read_checkpoint
from svhn.data.labels import canonical_predictions
from svhn.inference.checkpoints import load_reader
from svhn.inference.predictor import (
    PREDICT_BATCH_SIZE,
    build_trainer,
    evaluation_datamodule,
    predict_with_reader,
)
from svhn.model.metrics import whole_string_correct
from svhn.model.reader import FIRST_WINDOWS
from svhn.model.vote import chains_unsure, majority_share, vote_over_chains

__all__ = ["DEFAULT_GATES", "answers_differ", "format_search_table", "gate_sweep",
           "measure_search"]

DEFAULT_GATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0)


def gate_sweep(chain_probs: torch.Tensor, chain_boxes: torch.Tensor, full_probs: torch.Tensor,
               targets: torch.Tensor, gates: Sequence[float],
               majority: float | None = None) -> list[dict]:
    """Each gate's score from one full search, gated as the reader gates
    (``chains_unsure``; with ``majority``, in two steps as ``search_majority``): (N, K, L,
    11) chain probabilities and (N, K, 4) boxes in the search's order (the first chain, the
    box head's chain, then the windows'), the (N, L, 11) answer the full search gave, (N,
    L) targets."""
    kept, _ = vote_over_chains(chain_probs[:, :2], chain_boxes[:, :2])  # a skipped image's
    full_right = whole_string_correct(full_probs, targets).bool()
    count = len(targets)
    # A searched image's answer: the full search's, unless two steps decide it early (the
    # vote over its first two and its middle windows' chains holds a majority).
    decided_early, searched_answer = torch.zeros(count, dtype=torch.bool), full_probs
    if majority is not None:
        columns = [0, 1] + [2 + window for window in FIRST_WINDOWS]
        early, _ = vote_over_chains(chain_probs[:, columns], chain_boxes[:, columns])
        decided_early = majority_share(chain_probs[:, columns],
                                       chain_boxes[:, columns]) >= majority
        searched_answer = torch.where(decided_early[:, None, None], early, full_probs)
    rows = []
    for gate in gates:
        if gate >= 1:  # the full search: every image, every window
            searched, answer = torch.ones(count, dtype=torch.bool), full_probs
        else:
            searched = chains_unsure(chain_probs[:, 0], chain_probs[:, 1], chain_boxes[:, 0],
                                     chain_boxes[:, 1], gate)
            answer = torch.where(searched[:, None, None], searched_answer, kept)
        right = whole_string_correct(answer, targets).bool()
        # Where the gate matters: answers the full search would have given otherwise.
        missed = answers_differ(answer, full_probs)
        every_window = searched if gate >= 1 else searched & ~decided_early
        rows.append({
            "gate": gate, "searched_share": float(searched.float().mean()),
            "every_window_share": float(every_window.float().mean()),
            "score": float(right.float().mean()),
            "score_vs_full": float(right.float().mean() - full_right.float().mean()),
            "missed_changes": int(missed.sum()), "missed_share": int(missed.sum()) / count,
            "missed_full_right": int((missed & full_right).sum()),
            "missed_first_right": int((missed & right).sum()),
        })
    return rows


def answers_differ(probs: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(N,) where two (N, L, 11) answers write different strings (as the submission
    writes them)."""
    return ~(canonical_predictions(probs.float()) == canonical_predictions(other.float())).all(-1)


def _timed_pass(reader, datamodule, trainer) -> tuple[float, int, object]:
    """Seconds, crops read (every ``DigitReader.read``'s batch) and predictions of a pass."""
    crops = []
    read = reader.read
    reader.read = lambda images: crops.append(len(images)) or read(images)
    try:
        start = time.perf_counter()
        predictions = predict_with_reader(reader, datamodule, trainer)
        seconds = time.perf_counter() - start
    finally:
        del reader.read  # the class's own again
    return seconds, sum(crops), predictions


def measure_search(checkpoint: str | Path, data_dir: str | Path, split: str = "val",
                   gates: Sequence[float] = DEFAULT_GATES, gate: float | None = None,
                   majority: float | None = None, merge: float | None = None,
                   batch_size: int = PREDICT_BATCH_SIZE, num_workers: int = 0,
                   accelerator: str = "auto", repeats: int = 1) -> dict:
    """One checkpoint's full and gated passes over a labelled split (``repeats`` of each,
    alternating; each pass's time the median), and the gate sweep; ``gate``, ``majority``
    and ``merge`` None: the checkpoint's own."""
    contents = read_checkpoint(checkpoint)
    datamodule = evaluation_datamodule(contents, data_dir, split, batch_size=batch_size,
                                       num_workers=num_workers, labelled=True)
    full = load_reader(contents, zoom_search=True, search_gate=1.0)
    gated = load_reader(contents, zoom_search=True, search_gate=gate,
                        search_majority=majority, search_merge=merge)
    gate, majority, merge = gated.search_gate, gated.search_majority, gated.search_merge
    warm_up = build_trainer(accelerator, precision=contents.precision, progress_bar=False,
                            limit_batches=1)
    trainer = build_trainer(accelerator, precision=contents.precision, progress_bar=False)
    # The warm-up batch also builds the split's image cache, outside the timing (the
    # trainer's predict stage: only the split read, never the train set).
    predict_with_reader(full, datamodule, warm_up, subset=True)
    seconds: dict[str, list[float]] = {"full": [], "gated": []}
    for _ in range(repeats):
        full_time, full_crops, full_out = _timed_pass(full, datamodule, trainer)
        gated_time, gated_crops, gated_out = _timed_pass(gated, datamodule, trainer)
        seconds["full"].append(full_time)
        seconds["gated"].append(gated_time)
    full_seconds, gated_seconds = (statistics.median(seconds[key]) for key in ("full", "gated"))
    count = len(full_out)
    # How far the gated pass strays from the full one, image by image: with merging, the
    # sweep cannot replay it, and these counts are less noisy than the score difference.
    changed = answers_differ(gated_out.probs, full_out.probs)
    full_right = whole_string_correct(full_out.probs, full_out.targets).bool()
    gated_right = whole_string_correct(gated_out.probs, gated_out.targets).bool()
    sweep = gate_sweep(full_out.chain_probs, full_out.chain_boxes, full_out.probs,
                       full_out.targets, sorted({*gates, gate}), majority)
    return {
        "checkpoint": str(checkpoint), "split": split, "images": count,
        "batch_size": batch_size,
        "precision": contents.precision, "gate": gate, "majority": majority, "merge": merge,
        "repeats": repeats,
        "full": {"seconds": full_seconds, "seconds_each": seconds["full"],
                 "images_per_s": count / full_seconds,
                 "reads_per_image": full_crops / count,
                 "score": float(full_right.float().mean())},
        "gated": {"seconds": gated_seconds, "seconds_each": seconds["gated"],
                  "images_per_s": count / gated_seconds,
                  "score": float(gated_right.float().mean()),
                  "searched_share": float(gated_out.searched.float().mean()),
                  "reads_per_image": gated_crops / count,
                  "changed": int(changed.sum()),
                  "changed_full_right": int((changed & full_right).sum()),
                  "changed_gated_right": int((changed & gated_right).sum())},
        "speedup": full_seconds / gated_seconds,
        "sweep": sweep,
    }


def format_search_table(report: dict) -> str:
    full, gated = report["full"], report["gated"]
    majority = report.get("majority")
    steps = "" if majority is None else f", two steps at majority {majority:g}"
    if report.get("merge") is not None:
        steps += f", chains merged at IoU {report['merge']:g}"
    lines = [
        f"{Path(report['checkpoint']).name} on {report['split']} ({report['images']} images, "
        f"{report['precision']}, batch {report['batch_size']}; each pass's median of "
        f"{report['repeats']}):",
        f"  full search : {full['images_per_s']:7.1f} images/s  score {full['score']:.3f}  "
        f"{full['reads_per_image']:.1f} crop reads per image",
        f"  gated ({report['gate']:g}{steps}): {gated['images_per_s']:7.1f} images/s  score "
        f"{gated['score']:.3f}  searched {gated['searched_share']:.0%}  "
        f"{gated['reads_per_image']:.1f} crop reads per image  "
        f"-> {report['speedup']:.1f}x the full search's images/s",
        f"  answers the gated pass changed: {gated['changed']} ({gated['changed_full_right']} "
        f"right in the full search / {gated['changed_gated_right']} right gated)",
        "  gate   searched  all 27  score   vs full  missed changes (full right / gated right)",
    ]
    for row in report["sweep"]:
        lines.append(f"  {row['gate']:<6g} {row['searched_share']:7.0%}  "
                     f"{row['every_window_share']:6.0%}  {row['score']:.3f}  "
                     f"{row['score_vs_full']:+.3f}   {row['missed_changes']:3d} "
                     f"({row['missed_full_right']} / {row['missed_first_right']})")
    return "\n".join(lines)
