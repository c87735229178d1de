"""CATP's two scores written from the spec with Python loops, sharing no code with the method."""

from __future__ import annotations

import math


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-12)


def _unit(xs: list[float]) -> list[float]:
    low, high = min(xs), max(xs)
    return [0.0 if high == low else (x - low) / (high - low) for x in xs]


def paired_text(ids: list[int], real: list[bool], image_token: int) -> list[list[int]]:
    """Per run of ``image_token`` in ``ids``, in order, the positions of the real text tokens after it
    up to the next run."""
    out: list[list[int]] = []
    for p, token in enumerate(ids):
        if token == image_token:
            if p == 0 or ids[p - 1] != image_token:
                out.append([])
        elif out and real[p]:
            out[-1].append(p)
    return out


def select(image: list[list[float]], text: list[list[float]], keep: int, alpha: float) -> list[int]:
    """Stage 1: ``(1 - alpha)`` x diversity + ``alpha`` x paired-text alignment, each min-max scaled over
    the image; the ``keep`` best in order, ties to the lower index."""
    n = len(image)
    diversity = [1 - sum(_cos(image[i], image[j]) for j in range(n) if j != i) / max(1, n - 1) for i in range(n)]
    alignment = [sum(_cos(v, t) for t in text) / len(text) if text else 0.0 for v in image]
    d, a = _unit(diversity), _unit(alignment)
    score = [(1 - alpha) * d[i] + alpha * a[i] for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: (-score[i], i))[:keep])


def attention_rank(
    probs: list[list[float]], raters: list[int], columns: list[int], candidates: list[int], keep: int
) -> list[int]:
    """Stage 2: ``probs [L][L]`` (one layer, mean over heads); each candidate ``c`` (its sequence
    position ``columns[c]``) scored by the mean attention of the ``raters`` rows; the ``keep`` best."""
    score = {c: sum(probs[r][columns[c]] for r in raters) / len(raters) for c in candidates}
    return sorted(sorted(candidates, key=lambda c: -score[c])[:keep])
