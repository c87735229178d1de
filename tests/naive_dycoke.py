"""DyCoke written from the spec with Python loops, sharing no code with tokenreduce: which tokens
temporal token merging keeps, and which cached video tokens each decode step reads."""

from __future__ import annotations

import math


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-8)


def ttm_kept(tokens: list[list[float]], frames: int, merge_ratio: float) -> list[int]:
    """Indices (frame-major) of the tokens of one video that TTM keeps: frame f + 1 of each pair
    (f, f + 1), f even, and frame f + 2 for f = 0, 4, ... < frames - 4, keep the int((1 - k) * T)
    places least similar to the same place in frame f; other frames whole; ties to the lower place."""
    per_frame = len(tokens) // frames
    count = int((1 - merge_ratio) * per_frame)
    against = {}
    for f in range(0, frames - 1, 2):
        against[f + 1] = f
    for f in range(0, frames - 4, 4):
        against[f + 2] = f
    kept = []
    for f in range(frames):
        if f not in against:
            kept += [f * per_frame + t for t in range(per_frame)]
            continue
        e = against[f]
        similarity = [(_cosine(tokens[f * per_frame + t], tokens[e * per_frame + t]), t) for t in range(per_frame)]
        kept += sorted(f * per_frame + t for _, t in sorted(similarity)[:count])
    return kept


class DecodeSelector:
    """One video's decode-time selection, step by step: re-chosen (the int(n * (1 - p)) tokens most
    attended) at the first step and whenever the cosine to the previous step's attention is below the
    threshold; otherwise the previous selection."""

    def __init__(self, prune_ratio: float, threshold: float = 0.9):
        self.prune_ratio, self.threshold = prune_ratio, threshold
        self.previous: list[float] | None = None
        self.kept: list[int] | None = None
        self.reselected = 0  # steps that chose again

    def step(self, attention: list[float]) -> list[int]:
        stable = self.previous is not None and _cosine(attention, self.previous) >= self.threshold
        if not stable:
            self.reselected += 1
            count = int(len(attention) * (1 - self.prune_ratio))
            self.kept = sorted(sorted(range(len(attention)), key=lambda i: -attention[i])[:count])
        self.previous = attention
        return self.kept
