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


def recoverable_keep(
    cls: list[float], image: list[list[float]], text: list[list[float]], keep: int, recover: float
) -> dict[int, list[int]]:
    """Recoverable Compression as tokenreduce's docstring states it: the ``keep - round(recover * keep)``
    tokens of highest class-token attention; of the others, the ``round(recover * keep)`` whose best
    cosine to a text token is highest; every remaining token goes to its most cosine-similar kept
    token. Returns each kept token (ascending) with the tokens it averages (itself first)."""
    recovered = round(recover * keep)
    visual = keep - recovered
    img, txt = [_unit(v) for v in image], [_unit(v) for v in text]
    by_cls = sorted(range(len(image)), key=lambda i: -cls[i])  # ties: the earlier token
    picked, dropped = by_cls[:visual], by_cls[visual:]
    relevance = {i: max(_dot(img[i], t) for t in txt) for i in dropped}
    dropped = sorted(dropped, key=lambda i: -relevance[i])  # ties: higher class-token attention
    groups = {p: [p] for p in sorted(picked + dropped[:recovered])}
    for j in dropped[recovered:]:
        best = max(groups, key=lambda p: _dot(img[j], img[p]))
        groups[best].append(j)
    return groups


def mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]
