"""Naive oracle of PTP on one LLaVA-NeXT AnyRes image (Python loops and lists, written from the rule in
the method's docstring, sharing no code with tokenreduce): which tokens of the image's packed span the
LLM reads."""

from __future__ import annotations

import math

from naive_globalcom2 import crop_members, region_saliency, shares, span_layout


def _cosine(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / max(na, 1e-12) / max(nb, 1e-12)


def _unit_range(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [(v - low) / (high - low) if high > low else 0.0 for v in values]


def ptp_keep(
    cls: list[list[float]],
    size: tuple[int, int],
    rows: int,
    cols: int,
    side: int,
    r: float,
    text_weight: float,
    span: list[list[float]],
    text: list[list[float]],
) -> tuple[list[int], list[int]]:
    """Kept span indices (ascending) and each crop's budget. ``cls``: per tower image (the base first,
    then the crops row-major) the class token's attention to each of its ``side * side`` patches;
    ``span``: the image's packed span (projected tokens); ``text``: its prompt's text embeddings."""
    layout = span_layout(size, rows, cols, side)
    thumb = cls[0]
    saliency = region_saliency(thumb, rows, cols, side)
    members = crop_members(layout, rows, cols, side)
    counts = [len(m) for m in members]
    total = sum(counts)
    budget = shares([n * s for n, s in zip(counts, saliency)], min(total, max(1, round(r * total))), counts)

    def own_attention(i: int) -> float:
        kind, y, x = layout[i]
        if kind == "base":
            return thumb[y * side + x]
        return cls[1 + (y // side) * cols + x // side][(y % side) * side + x % side]

    def relevance(i: int) -> float:
        return max((_cosine(span[i], t) for t in text), default=0.0)

    base = [i for i, t in enumerate(layout) if t[0] == "base"]
    kept = [i for i, t in enumerate(layout) if t[0] == "newline"]
    regions = [(base, min(len(base), max(1, round(r * len(base)))))] + list(zip(members, budget))
    for idx, k in regions:
        own = _unit_range([own_attention(i) for i in idx]) if idx else []
        rel = _unit_range([relevance(i) for i in idx]) if idx else []
        score = [(1 - text_weight) * a + text_weight * b for a, b in zip(own, rel)]
        kept += [idx[j] for j in sorted(range(len(idx)), key=lambda j: (-score[j], j))[:k]]
    return sorted(kept), budget
