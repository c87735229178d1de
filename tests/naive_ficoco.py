"""Naive loops for FiCoCo on one image, written from the paper and the rules tokenreduce documents,
sharing no code with tokenreduce. FiCoCo-V: filter by the integrated score with a local penalty,
correlate by attention, compress by a weighted average with the kept token's own weight 1. FiCoCo-L:
filter by redundancy minus text relevance, correlate directly and through the text, compress by a sum."""

from __future__ import annotations

import math

from torch import Tensor


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _unit(values: list[float]) -> list[float]:
    norm = max(math.sqrt(sum(v * v for v in values)), 1e-12)
    return [v / norm for v in values]


def ficoco_v(
    hidden: Tensor,
    q: Tensor,
    k: Tensor,
    scale: float,
    prefix: int,
    keep: int,
    grid: tuple[int, int],
    beta: float = 0.35,
    window: int = 2,
    quantile: float = 0.998,
) -> tuple[list[int], list[list[float]]]:
    """``hidden [T, C]``, ``q``/``k [H, T, d]`` of the read layer: ``(kept patch indices, output tokens)``."""
    heads, t = q.shape[0], q.shape[1]
    a = [[sum(float(q[h, i] @ k[h, j]) * scale for h in range(heads)) / heads for j in range(t)] for i in range(t)]
    n = t - prefix
    cls = [a[0][prefix + j] if prefix else 0.0 for j in range(n)]
    sim = [sum(a[prefix + i][prefix + j] for j in range(n)) / n for i in range(n)]
    score = [beta * c - (1 - beta) * s for c, s in zip(_unit(cls), _unit(sim))]
    rows, cols = grid
    for cy in range(rows // window):
        for cx in range(cols // window):
            cell = [(cy * window + dy) * cols + cx * window + dx for dy in range(window) for dx in range(window)]
            low = min(cell, key=lambda i: (score[i], cell.index(i)))
            score[low] = score[low] / 2 if score[low] > 0 else score[low] * 2
    ranked = sorted(range(n), key=lambda i: (score[i], i))
    dropped, kept = ranked[: n - keep], sorted(ranked[n - keep :])
    x = [[float(v) for v in row] for row in hidden]
    total = {j: 1.0 for j in kept}
    acc = {j: list(x[prefix + j]) for j in kept}
    for i in dropped:
        row = a[prefix + i]
        count = max(1, sum(v > _quantile(row, quantile) for v in row))
        top = max(row)
        probs = [math.exp(v - top) for v in row]
        probs = [v / sum(probs) for v in probs]
        targets = sorted(kept, key=lambda j: (-probs[prefix + j], kept.index(j)))[:count]
        norm = sum(probs[prefix + j] for j in targets)
        for j in targets:
            w = probs[prefix + j] / norm
            total[j] += w
            acc[j] = [s + w * v for s, v in zip(acc[j], x[prefix + i])]
    return kept, [[v / total[j] for v in acc[j]] for j in kept]


def ficoco_l(
    image: Tensor,
    q: Tensor,
    k: Tensor,
    scale: float,
    keep: int,
    beta: float = 0.6,
    alpha: float = 0.6,
    quantile: float = 0.998,
) -> tuple[list[int], list[list[float]]]:
    """FiCoCo-L at one layer, one image: ``image [N, C]`` its tokens entering the layer, ``q``/``k
    [H, T, d]`` the scoring layer's queries and keys (one key per query head) over the image's ``N``
    tokens then the text after it: ``(kept indices, output tokens)``."""
    heads, t = q.shape[0], q.shape[1]
    n = image.shape[0]
    a = [[sum(float(q[h, i] @ k[h, j]) * scale for h in range(heads)) / heads for j in range(t)] for i in range(t)]
    text = range(n, t)
    score = [beta * sum(a[i][j] for j in range(n)) - (1 - beta) * sum(a[i][j] for j in text) / len(text) for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (-score[i], i))
    dropped, kept = ranked[: n - keep], sorted(ranked[n - keep :])
    x = [[float(v) for v in row] for row in image]
    out = {j: list(x[j]) for j in kept}
    for i in dropped:
        corr = {j: alpha * a[i][j] + (1 - alpha) * sum(a[i][s] * a[s][j] for s in text) for j in range(n) if j != i}
        count = max(1, sum(v > _quantile(list(corr.values()), quantile) for v in corr.values()))
        top = max(corr.values())
        total = sum(math.exp(v - top) for v in corr.values())
        prob = {j: math.exp(v - top) / total for j, v in corr.items()}
        targets = sorted(kept, key=lambda j: (-prob[j], kept.index(j)))[:count]
        norm = sum(prob[j] for j in targets)
        for j in targets:
            out[j] = [s + prob[j] / norm * v for s, v in zip(out[j], x[i])]
    return kept, [out[j] for j in kept]
