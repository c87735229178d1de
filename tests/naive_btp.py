"""Naive oracles for BTP, written from the spec's summary of the paper (arXiv 2505.22038): plain Python
loops; they share no code with tokenreduce (the k-center and last-token ranking loops are the other
oracles', naive_todre.py and naive_gsearch.py)."""

from __future__ import annotations

from torch import Tensor

from naive_gsearch import rank_by_last_token
from naive_todre import k_center


def stage_layers(stages: int, depth: int) -> list[int]:
    """The default stage layers: PyramidDrop's ends ``(j + 1) * depth // (stages + 1)``."""
    return [max(1, (j + 1) * depth // (stages + 1)) for j in range(stages)]


def diverse(hidden: Tensor, start: int, candidates: list[int], keep: int) -> list[int]:
    """One image at an early stage: ``hidden [L, D]`` the stage layer's input; the greedy k-center
    subset of the candidates' states (indices in the image's span from ``start``), in order."""
    picked = k_center(hidden[[start + c for c in candidates]], keep)
    return [candidates[i] for i in picked]


def attended(probs: Tensor, start: int, last: int, candidates: list[int], keep: int) -> list[int]:
    """One image at a deep stage: the candidates the last prompt token attends to most (``probs [H, L, L]``)."""
    return rank_by_last_token(probs, start, last, candidates, keep)
