"""Splitting a video's frames into temporal segments: at the least similar transitions (FastVID's
dynamic segmentation) or into windows that maximise the tokens static across them (HoliTom)."""

from __future__ import annotations

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
