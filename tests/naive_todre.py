"""Naive loops for ToDRE's diversity stage, written from the paper's description (greedy k-center and
greedy max-sum diversification over cosine distance), sharing no code with tokenreduce."""

from __future__ import annotations

from torch import Tensor


def _distances(features: Tensor) -> list[list[float]]:
    unit = [f / f.norm() for f in features.double()]
    return [[1.0 - float(unit[i] @ unit[j]) for j in range(len(unit))] for i in range(len(unit))]


def k_center(features: Tensor, k: int) -> list[int]:
    """Greedy k-center on one image ``features [N, D]``: start at the token farthest from its nearest
    other token, then add the token farthest from its nearest picked one; position order."""
    dist = _distances(features)
    n = len(dist)
    nearest_other = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest_other[i], -i))]
    while len(picked) < k:
        gap = {i: min(dist[i][p] for p in picked) for i in range(n) if i not in picked}
        picked.append(max(gap, key=lambda i: (gap[i], -i)))
    return sorted(picked)


def max_sum(features: Tensor, k: int) -> list[int]:
    """Greedy max-sum diversification on one image: start at the token with the largest summed
    distance to all tokens, then add the unpicked token with the largest summed distance to the picked
    ones; position order."""
    dist = _distances(features)
    n = len(dist)
    picked = [max(range(n), key=lambda i: (sum(dist[i]), -i))]
    while len(picked) < k:
        total = {i: sum(dist[i][p] for p in picked) for i in range(n) if i not in picked}
        picked.append(max(total, key=lambda i: (total[i], -i)))
    return sorted(picked)
