"""Importance-based token merging written from the spec (section 1.3) and the method's docstring with Python
loops, sharing no code with tokenreduce: the random draw is the counter hash re-written in plain integers."""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF


def hash_key(seed: int, block: int, timestep: float) -> int:
    """The draw's key: the seed, the block and the timestep value."""
    return seed * 1_000_003 + block * 7919 + round(timestep * 1_000_003)


def hash_score(i: int, key: int) -> int:
    """The counter hash of position ``i`` (multiply, then two xor-shift-multiply rounds)."""
    h = (i * 2654435761 + (key & MASK)) & MASK
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK
    return h ^ (h >> 16)


def guidance_map(uncond: torch.Tensor, cond: torch.Tensor) -> list[list[float]]:
    """``|cond - uncond|`` averaged over channels for one image ``[C, H, W]``, as nested lists."""
    c, h, w = cond.shape
    return [[sum(abs(float(cond[k, i, j]) - float(uncond[k, i, j])) for k in range(c)) / c for j in range(w)] for i in range(h)]


def partition(importance: list[float], r: int, kk: float, pp: float, key: int) -> tuple[list[int], list[int], float]:
    """``(destinations, sources, threshold)``: the ``int(N kk)`` destinations drawn from the pool of the
    ``M = min(N, int((N - r) pp))`` most important tokens (equal importance: lower position first); the
    pool's places are ranked by their hash, the highest drawn; the threshold is the pool's lowest importance."""
    n = len(importance)
    num_dst = int(n * kk)
    m = max(num_dst, min(n, int((n - r) * pp)))
    ranked = sorted(range(n), key=lambda t: (-importance[t], t))
    pool = sorted(ranked[:m])
    threshold = importance[ranked[m - 1]]
    places = sorted(range(m), key=lambda p: -hash_score(p, key))[:num_dst]
    dst = [pool[p] for p in sorted(places)]
    src = [t for t in range(n) if t not in set(dst)]
    return dst, src, threshold


def plan(x: torch.Tensor, importance: list[float], ratio: float, kk: float, pp: float, key: int):
    """One row ``x [N, C]`` (the metric). Returns ``(groups, unmerged)``: the tokens each destination
    gathers (itself first) in destination order, and the unmerged sources in output order (sources
    below the threshold ranked first, then by their best cosine similarity, descending)."""
    n = x.shape[0]
    r = int(n * ratio)
    dst, src, threshold = partition(importance, r, kk, pp, key)
    r = min(r, len(src))
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    similarity = (unit[src] @ unit[dst].T).tolist()  # cosine of every source (row) to every destination
    edges = []
    for s, sims in zip(src, similarity):
        best = max(range(len(dst)), key=lambda i: sims[i])
        edges.append((importance[s] < threshold, sims[best], s, best))
    edges.sort(key=lambda e: (not e[0], -e[1]))
    groups = [[d] for d in dst]
    for _, _, s, best in edges[:r]:
        groups[best].append(s)
    return groups, [s for _, _, s, _ in edges[r:]]


def merge(x: torch.Tensor, groups, unmerged, average: bool = True):
    """Merged tokens ``[unmerged sources, destinations]`` and the output each input token went to."""
    out = [x[s] for s in unmerged]
    for g in groups:
        out.append(torch.stack([x[t] for t in g]).mean(0) if average else x[g[0]])
    where = [0] * x.shape[0]
    for i, s in enumerate(unmerged):
        where[s] = i
    for k, g in enumerate(groups):
        for t in g:
            where[t] = len(unmerged) + k
    return torch.stack(out), where


def unmerge(y: torch.Tensor, where: list[int]) -> torch.Tensor:
    return torch.stack([y[j] for j in where])
