"""Naive oracles for the pre-LLM methods that read the prompt's text, written from the spec with Python
loops over lists of floats (double precision); they share no code with tokenreduce."""

from __future__ import annotations

import math


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def simignore_keep(image: list[list[float]], text: list[list[float]], k2: int) -> list[int]:
    """Spec §4.14: ``S = norm(image) norm(text)^T``; sort all pairs descending; walk them with step 1
    from index 1, collecting distinct image rows until ``k2``. Returns the collected rows, sorted."""
    img, txt = [_unit(v) for v in image], [_unit(v) for v in text]
    pairs = []
    for i, a in enumerate(img):
        for t, b in enumerate(txt):
            pairs.append((_dot(a, b), i * len(txt) + t, i))
    pairs.sort(key=lambda p: (-p[0], p[1]))  # ties: the earlier pair, as a stable sort
    collected: list[int] = []
    index = 1
    while len(collected) < k2 and index < len(pairs):
        row = pairs[index][2]
        if row not in collected:
            collected.append(row)
        index += 1
    return sorted(collected)
