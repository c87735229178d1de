"""Token selection across the frames of a video, pure tensor code: splitting the frames into temporal
segments at the least similar transitions (FastVID's dynamic segmentation) or into windows that
maximise the tokens static across them (HoliTom), and dropping the tokens of a frame that repeat the
frame before (DyCoke)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def cut_segments(similarity: Tensor, cuts: int, threshold: float) -> list[int]:
    """Lengths of the segments of ``T`` frames, from ``similarity [T - 1]`` between consecutive frames:
    a segment ends after each of the ``cuts`` least similar transitions (all of them when there are
    fewer; the earlier of equal ones first) and after every transition below ``threshold``. The lengths
    sum to ``T``, in frame order."""
    frames = similarity.shape[0] + 1
    least = similarity.argsort(stable=True)[: min(cuts, frames - 1)]
    ends = sorted(set(least.tolist()) | set((similarity < threshold).nonzero().flatten().tolist()))
    bounds = [-1, *ends, frames - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def static_windows(static: Tensor, max_window: int | None = None) -> list[tuple[int, int]]:
    """Windows ``(first, last)`` (inclusive) covering ``T`` frames in order, from ``static [T - 1, P]``
    (token ``p`` barely changes from frame ``t`` to ``t + 1``): the split that maximises the tokens saved by
    merging each window's static tokens over time, ``sum over windows of (tokens static through the
    whole window) * (its length - 1)``, windows at most ``max_window`` frames long (``None``: any).

    Dynamic programming over the last frame: a frame alone keeps the best value before it, and a longer
    window replaces it only when strictly better, shorter windows first (so equal values favour single
    frames and short windows)."""
    frames = static.shape[0] + 1
    longest = frames if max_window is None else max_window
    best = [0] * (frames + 1)  # best[i + 1]: the best value of frames 0..i
    first = list(range(frames))  # the first frame of the window ending at each frame
    for last in range(frames):
        best[last + 1], run = best[last], static.new_ones(static.shape[1])
        for length in range(2, min(last + 1, longest) + 1):
            start = last - length + 1
            run = run & static[start]
            value = best[start] + int(run.sum()) * (length - 1)
            if value > best[last + 1]:
                best[last + 1], first[last] = value, start
    windows, last = [], frames - 1
    while last >= 0:
        windows.append((first[last], last))
        last = first[last] - 1
    return windows[::-1]


def frame_pair_drop(features: Tensor, pairs: Sequence[tuple[int, int]], keep: int) -> Tensor:
    """Keep, of each frame ``later`` of ``pairs`` (``(later, earlier)``), the ``keep`` tokens least
    cosine-similar to the token at the same place in frame ``earlier``; every other frame stays whole.

    ``features [M, F, T, D]``: ``M`` videos of ``F`` frames of ``T`` tokens (the same places in every
    frame). Similarities compare the original features, in float32; ties go to the lower place. Each
    ``later`` frame appears at most once. Returns the kept tokens' indices into the frame-major
    ``F * T`` tokens, increasing: ``[M, F * T - len(pairs) * (T - keep)]``.
    """
    m, frames, tokens, _ = features.shape
    if not 0 <= keep <= tokens:
        raise ValueError(f"keep must be in [0, {tokens}] for frames of {tokens} tokens, got {keep}")
    kept = torch.ones(m, frames, tokens, dtype=torch.bool, device=features.device)
    for later, earlier in pairs:
        similarity = F.cosine_similarity(features[:, later].float(), features[:, earlier].float(), dim=-1)  # [M, T]
        order = similarity.argsort(dim=1, stable=True)  # least similar first, ties by place
        kept[:, later] = False
        kept[:, later].scatter_(1, order[:, :keep], True)
    count = frames * tokens - len(pairs) * (tokens - keep)
    return kept.flatten(1).nonzero()[:, 1].view(m, count)
