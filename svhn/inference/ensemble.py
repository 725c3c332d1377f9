"""Ensembles: several checkpoints' (and views') predictions combined into one answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from svhn.checkpoint_format import CheckpointContents, CheckpointError
from svhn.inference.predictions import Predictions, any_searched, cat_or_none
from svhn.model.vote import pick_chain, winning_chain

__all__ = ["combination_notice", "combine", "shared_max_len"]


def combine(members: Sequence[Predictions]) -> Predictions:
    """The ensemble. Members that all ran the zoom search: one vote over all their chains
    together (each member's chains back the others' where they agree on the reading and
    the place). Otherwise: mean probabilities (and boxes, when every member has them)."""
    first = members[0]
    for other in members[1:]:
        if other.file_names != first.file_names:
            raise RuntimeError("ensemble members predicted different images.")
    chain_probs = cat_or_none([m.chain_probs for m in members], dim=1)
    chain_boxes = cat_or_none([m.chain_boxes for m in members], dim=1)
    if chain_probs is not None and chain_boxes is not None:
        winner = winning_chain(chain_probs, chain_boxes)
        chain_char_boxes = cat_or_none([m.chain_char_boxes for m in members], dim=1)
        return Predictions(file_names=first.file_names, probs=pick_chain(chain_probs, winner),
                           boxes=pick_chain(chain_boxes, winner),
                           targets=first.targets, chain_probs=chain_probs,
                           chain_boxes=chain_boxes,
                           searched=any_searched([m.searched for m in members]),
                           char_boxes=None if chain_char_boxes is None else
                           pick_chain(chain_char_boxes, winner),
                           chain_char_boxes=chain_char_boxes)
    probs = torch.stack([m.probs for m in members]).mean(dim=0)
    return Predictions(file_names=first.file_names, probs=probs, boxes=_mean_or_none(
        [m.boxes for m in members]), targets=first.targets,
        char_boxes=_mean_or_none([m.char_boxes for m in members]))


def _mean_or_none(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The members' mean, when every member has one."""
    if any(t is None for t in tensors):
        return None
    return torch.stack(tensors).mean(dim=0)  # type: ignore[arg-type]


def combination_notice(members: Sequence[Predictions], paths: Sequence[Path]) -> str:
    """Says how ``combine`` joins these members, and why when it cannot vote."""
    without = [path.name for path, m in zip(paths, members) if m.chain_probs is None]
    if not without:
        chains = sum(m.chain_probs.shape[1] for m in members)  # type: ignore[union-attr]
        return f"Ensemble of {len(members)}: one vote over all {chains} zoom chains."
    if len(without) == len(members):
        return f"Ensemble of {len(members)}: per-position probabilities averaged."
    return (f"Ensemble of {len(members)}: per-position probabilities averaged, not a vote over "
            f"zoom chains: {', '.join(without)} does not run the zoom search (--zoom_search "
            "turns it on for every checkpoint that zooms).")


def shared_max_len(contents: Sequence[CheckpointContents]) -> int:
    """Averaging or voting over positions needs the same number of them in every model of
    an ensemble."""
    lengths = {c.max_len for c in contents}
    if len(lengths) > 1:
        listing = ", ".join(f"{c.path.name}: {c.max_len}" for c in contents)
        raise CheckpointError(f"checkpoints disagree on max_len ({listing}); an ensemble "
                              "compares their readings position by position, so they must "
                              "match.")
    return lengths.pop()
