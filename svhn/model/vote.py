"""The zoom search's vote: which of several zoom chains' readings an image's answer is.
"""

from __future__ import annotations

import torch

from svhn.data.labels import BLANK, canonical_predictions
from svhn.geometry import paired_iou, pairwise_iou

__all__ = ["answer_confidence", "chain_confidence", "chains_unsure", "majority_share",
           "pick_chain", "vote", "vote_over_chains", "vote_probabilities", "voted_chain",
           "winning_chain"]


def voted_chain(chains: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per image, every output of the chain ``vote`` picks, plus every chain's reading
    (``chain_logits`` (B, K, max_len, 11)) and final box (``chain_boxes`` (B, K, 4)), so an
    ensemble or test-time views can vote over all their chains together; with the digits'
    own boxes, every chain's too (``chain_char_boxes`` (B, K, max_len, 4))."""
    stacked = {key: torch.stack([chain[key] for chain in chains], dim=1) for key in chains[0]}
    winner = vote(stacked["logits"].transpose(0, 1), stacked["box"].transpose(0, 1))
    result = {key: pick_chain(value, winner) for key, value in stacked.items()}
    result["chain_logits"] = stacked["logits"]
    result["chain_boxes"] = stacked["box"]
    if "char_boxes" in stacked:
        result["chain_char_boxes"] = stacked["char_boxes"]
    return result


def vote(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The winning chain of each image from (K, B, max_len, 11) chain logits and (K, B, 4)
    the boxes the chains ended on: the chain whose reading (as the submission writes it) has
    the most support, then the most probable of those. A chain's support is the summed
    probability of the chains that read as it does, each weighted by how much their boxes
    overlap (IoU): chains that agree on the reading and on the place back each other, while
    the same reading found in unrelated places (a lamp, a window) adds little. A chain's
    probability is the product of its positions' top probabilities. (B,) chain indices."""
    return vote_probabilities(logits.float().softmax(-1), boxes)


def vote_probabilities(probs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``vote`` over chains given as (K, B, max_len, 11) probabilities."""
    support, confidence = _support(probs, boxes)
    best = support == support.amax(0, keepdim=True)
    return torch.where(best, confidence, -1.0).argmax(0)


def majority_share(chain_probs: torch.Tensor, chain_boxes: torch.Tensor) -> torch.Tensor:
    """(N,) how decided an image's vote is: the winning chain's support (``vote``) as a
    share of all its (N, K, max_len, 11) chains' confidence on (N, K, 4) boxes. 1: every
    chain reads the same number in the same place; below 0.5: no reading holds a majority."""
    support, confidence = _support(chain_probs.transpose(0, 1), chain_boxes.transpose(0, 1))
    return support.amax(0) / confidence.sum(0).clamp(min=1e-12)


def _support(probs: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of (K, B, max_len, 11) chains' support (K, B): the summed confidence of the
    chains that read as it does (itself included), each weighted by their boxes' IoU; and
    the chains' confidence (K, B)."""
    probs = probs.float()
    readings = canonical_predictions(probs.flatten(0, 1)).view(*probs.shape[:3])
    confidence = chain_confidence(probs)  # (K, B)
    agree = (readings[:, None] == readings[None]).all(-1)  # (K, K, B)
    return (agree * pairwise_iou(boxes) * confidence[None]).sum(1), confidence


def vote_over_chains(chain_probs: torch.Tensor, chain_boxes: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities (N, max_len, 11) and box (N, 4) of the chain ``vote`` picks among
    (N, K, max_len, 11) chain probabilities ending on (N, K, 4) boxes."""
    winner = winning_chain(chain_probs, chain_boxes)
    return pick_chain(chain_probs, winner), pick_chain(chain_boxes, winner)


def winning_chain(chain_probs: torch.Tensor, chain_boxes: torch.Tensor) -> torch.Tensor:
    """(N,) the index of the chain ``vote`` picks among (N, K, max_len, 11) chain
    probabilities ending on (N, K, 4) boxes (to pick any other per-chain output)."""
    return vote_probabilities(chain_probs.transpose(0, 1), chain_boxes.transpose(0, 1))


def chain_confidence(probs: torch.Tensor) -> torch.Tensor:
    """How sure a reading is: the product of its positions' top probabilities
    ((..., max_len, 11) -> (...)); the vote's weight, and the analysis's confidence."""
    return probs.amax(-1).prod(-1)


def answer_confidence(probs: torch.Tensor, chain_probs: torch.Tensor | None = None,
                      chain_boxes: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) how sure an answer is, for keeping it as a pseudo-label: its reading's
    confidence (``chain_confidence`` of (N, max_len, 11) probabilities), times, after a zoom
    search ((N, K, max_len, 11) chain probabilities, (N, K, 4) boxes), the share of the vote
    its reading holds (``majority_share``): a confident chain outvoted or barely ahead is
    not sure."""
    confidence = chain_confidence(probs.float())
    if chain_probs is None or chain_boxes is None:
        return confidence
    return confidence * majority_share(chain_probs.float(), chain_boxes.float())


def pick_chain(per_chain: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """Row ``winner[i]`` of image i's chains: (N, K, ...) and (N,) -> (N, ...)."""
    rows = torch.arange(len(winner), device=winner.device)
    return per_chain[rows, winner]



def chains_unsure(first: torch.Tensor, second: torch.Tensor, first_box: torch.Tensor,
                  second_box: torch.Tensor, gate: float) -> torch.Tensor:
    """(B,) where an image is worth the zoom search, from its first two chains' (B, max_len,
    11) probabilities and (B, 4) final boxes: they read different numbers (as the
    submission writes them), or in different places (box IoU at most 0.5), or the first is
    less confident than ``gate``, or the first read no digit at all (sure of blanks is
    sure of nothing: a weak model's blanks would pass any gate). The reader's gate and the
    search bench's sweep."""
    agree = (canonical_predictions(first) == canonical_predictions(second)).all(-1)
    overlap = paired_iou(first_box, second_box)
    no_digit = (first.argmax(-1) == BLANK).all(-1)
    return ~agree | (overlap <= 0.5) | (chain_confidence(first.float()) < gate) | no_digit
