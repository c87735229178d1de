"""Naive oracles for ZOO-Prune and Script, written from the spec (§5) and the rules the methods' docstrings
state, with Python loops over lists of floats (double precision); they share no code with tokenreduce.
The projector is the model's own module, passed in as a function of one token."""

from __future__ import annotations

import math
from collections.abc import Callable

MASK = 0xFFFFFFFF


def _hash(position: int, key: int) -> int:
    h = (position * 2654435761 + (key & MASK)) & MASK
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK
    return h ^ (h >> 16)


def counter_normal(n: int, key: int) -> list[float]:
    """``n`` standard normal deviates: Box-Muller on the counter hash of positions ``0..2n-1``."""
    out = []
    for i in range(n):
        u1 = (_hash(i, key) + 0.5) / 2**32
        u2 = _hash(n + i, key) / 2**32
        out.append(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2))
    return out


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def zoo_prune_keep(
    x: list[list[float]], project: Callable[[list[float]], list[float]], k: int, eps: float, samples: int, bound: float, seed: int
) -> list[int]:
    """ZOO-Prune on one image's patch features ``x [n][C]``: sensitivity = mean over ``samples`` noise
    draws of ``|P(x_i + eps*sigma*u) - P(x_i)| / (eps*sigma)``, ``sigma`` the RMS of ``x``, ``u`` draw
    ``s`` the deviates ``[s*n*C + i*C + c]``; then in decreasing sensitivity, take a token unless its
    cosine to a taken one (projected) exceeds ``bound``; fill up with the most sensitive others."""
    n, c = len(x), len(x[0])
    sigma = math.sqrt(sum(v * v for row in x for v in row) / (n * c))
    step = eps * sigma
    noise = counter_normal(samples * n * c, seed)
    base = [project(row) for row in x]
    sens = []
    for i in range(n):
        total = 0.0
        for s in range(samples):
            u = noise[(s * n + i) * c : (s * n + i + 1) * c]
            moved = project([a + step * b for a, b in zip(x[i], u)])
            total += _norm([p - q for p, q in zip(moved, base[i])]) / step
        sens.append(total / samples)
    order = sorted(range(n), key=lambda i: (-sens[i], i))
    taken: list[int] = []
    for i in order:
        if len(taken) == k:
            break
        if all(_cos(base[i], base[j]) <= bound for j in taken):
            taken.append(i)
    for i in order:
        if len(taken) < k and i not in taken:
            taken.append(i)
    return sorted(taken)


def _dpp_order(kernel: list[list[float]], steps: int) -> list[int]:
    """Greedy MAP: each step picks the token maximising det of the picked submatrix (by brute force
    over determinants), ties to the lower index."""
    picked: list[int] = []
    for _ in range(steps):
        best, best_det = None, -math.inf
        for j in range(len(kernel)):
            if j in picked:
                continue
            d = _det([[kernel[a][b] for b in picked + [j]] for a in picked + [j]])
            if best is None or d > best_det + 1e-12 * max(1.0, abs(best_det)):
                best, best_det = j, d
        picked.append(best)
    return picked


def _det(a: list[list[float]]) -> float:
    a = [row[:] for row in a]
    n, det = len(a), 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if a[pivot][col] == 0:
            return 0.0
        if pivot != col:
            a[col], a[pivot] = a[pivot], a[col]
            det = -det
        det *= a[col][col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for cc in range(col, n):
                a[r][cc] -= f * a[col][cc]
    return det


def script_keep(v: list[list[float]], text: list[list[float]], k: int, tau: float, relevance: float) -> list[int]:
    """Script on one image's projected tokens ``v`` and its prompt's text embeddings: graph ranks by
    increasing summed similarity over edges (opposite index parity, cosine > tau); DPP ranks in greedy
    MAP order of ``L_ij = w_i cos(v_i, v_j) w_j``, ``w = exp(relevance * minmax(cos(v, mean text)))``; the
    kept tokens are the first ``k`` by (max of the two ranks, min of them, index)."""
    n = len(v)
    sim = [[_cos(a, b) for b in v] for a in v]
    red = [sum(sim[i][j] for j in range(n) if j % 2 != i % 2 and sim[i][j] > tau) for i in range(n)]
    graph = {t: r for r, t in enumerate(sorted(range(n), key=lambda i: (red[i], i)))}
    query = [sum(col) / len(text) for col in zip(*text)]
    rel = [_cos(a, query) for a in v]
    lo, hi = min(rel), max(rel)
    w = [math.exp(relevance * ((r - lo) / (hi - lo) if hi > lo else 0.0)) for r in rel]
    kernel = [[w[i] * sim[i][j] * w[j] for j in range(n)] for i in range(n)]
    order = _dpp_order(kernel, n)
    dpp = {t: r for r, t in enumerate(order)}
    ranked = sorted(range(n), key=lambda i: (max(graph[i], dpp[i]), min(graph[i], dpp[i]), i))
    return sorted(ranked[:k])
