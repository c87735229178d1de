"""Naive re-implementations of Vote&Mix, Token Transforming and BAT, from the rules their tokenreduce
docstrings write down: one sample at a time, Python loops over tokens and plain floats, no tokenreduce
code. Each step takes one sample's tokens ``x [N, C]``, the keys averaged over heads ``metric [N, D]``
and the sizes ``size [N]``, and returns the new ``(x, size)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _cosines(metric: Tensor) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in metric.double()]
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    n = len(rows)
    return [[sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [v / sum(e) for v in e]


def vomix_step(x: Tensor, metric: Tensor, size: Tensor, remove: int, prefix: int, temperature: float = 1.0):
    """Vote, remove the ``remove`` most voted-for tokens, mix them into the kept ones (added)."""
    n = x.shape[0]
    sim = _cosines(metric)
    patches = list(range(prefix, n))
    votes = {j: 0.0 for j in patches}
    for i in patches:
        best = max((j for j in patches if j != i), key=lambda j: (sim[i][j], -j))
        votes[best] += sim[i][best]
    ranked = sorted(patches, key=lambda j: (-votes[j], j))
    removed, kept = ranked[:remove], sorted(ranked[remove:])
    rows, sizes = [x[i] for i in range(prefix)], [float(size[i]) for i in range(prefix)]
    weights = {s: _softmax([sim[s][k] / temperature for k in kept]) for s in removed}
    for a, k in enumerate(kept):
        rows.append(x[k] + sum(weights[s][a] * x[s] for s in removed) if removed else x[k])
        sizes.append(float(size[k]) + sum(weights[s][a] * float(size[s]) for s in removed))
    return torch.stack(rows), torch.tensor(sizes)


def transform_step(
    x: Tensor, metric: Tensor, size: Tensor, importance: list[float], num_out: int, prefix: int, spread: int, temperature: float
):
    """Targets: the most important tokens; every other token sent to its ``spread`` most similar
    targets with softmax weights; outputs the size-weighted means of what they receive."""
    n = x.shape[0]
    sim = _cosines(metric)
    patches = list(range(prefix, n))
    targets = sorted(sorted(patches, key=lambda j: (-importance[j - prefix], j))[: num_out - prefix])
    received = {t: [] for t in targets}  # target -> [(token, weight)]
    for i in patches:
        if i in received:
            received[i].append((i, 1.0))
            continue
        nearest = sorted(targets, key=lambda t: (-sim[i][t], t))[:spread]
        for t, w in zip(nearest, _softmax([sim[i][t] / temperature for t in nearest])):
            received[t].append((i, w))
    rows, sizes = [x[i] for i in range(prefix)], [float(size[i]) for i in range(prefix)]
    for t in targets:
        mass = sum(w * float(size[i]) for i, w in received[t])
        rows.append(sum(w * float(size[i]) * x[i] for i, w in received[t]) / mass)
        sizes.append(mass)
    return torch.stack(rows), torch.tensor(sizes)


def density_peaks(points: Tensor, clusters: int, neighbours: int) -> tuple[list[int], list[int]]:
    """DPC-kNN: ``(assignment per point, centres)``, ties to the earlier point."""
    n, dim = points.shape
    p = [[float(v) for v in row] for row in points.double()]
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(p[i], p[j])) / dim) for j in range(n)] for i in range(n)]
    k = min(neighbours, n)
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:k]) / k) for i in range(n)]
    largest = max(max(row) for row in dist)
    parent = []
    for i in range(n):
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        parent.append(min(dist[i][j] for j in denser) if denser else largest)
    centres = sorted(range(n), key=lambda i: (-parent[i] * density[i], i))[:clusters]
    assignment = [min(range(clusters), key=lambda c: (dist[i][centres[c]], c)) for i in range(n)]
    for c, i in enumerate(centres):
        assignment[i] = c
    return assignment, centres


def tome_step(x: list[Tensor], metric: list[Tensor], size: list[float], r: int, prefix: int):
    """ToMe's bipartite soft matching on lists of tokens: alternate A/B sides after the prefix, the ``r``
    A tokens with the most similar B partner merged into it (size-weighted); output prefix, the other A
    tokens in position order, then the B tokens."""
    n = len(x)
    sim = _cosines(torch.stack(metric))
    a_side = [i for i in range(prefix, n) if i % 2 == 0]
    b_side = [j for j in range(prefix, n) if j % 2 == 1]
    best = {i: max(b_side, key=lambda j: (sim[i][j], -j)) for i in a_side}
    ranked = sorted(a_side, key=lambda i: (-sim[i][best[i]], i))
    merged, unmerged = ranked[:r], sorted(ranked[r:])
    rows, sizes = list(x[:prefix]), list(size[:prefix])
    rows += [x[i] for i in unmerged]
    sizes += [size[i] for i in unmerged]
    for j in b_side:
        group = [j] + [i for i in merged if best[i] == j]
        mass = sum(size[i] for i in group)
        rows.append(sum(size[i] * x[i] for i in group) / mass)
        sizes.append(mass)
    return rows, sizes


def bat_step(
    x: Tensor,
    metric: Tensor,
    size: Tensor,
    cls_attn: list[float],
    keep_rate: float,
    prefix: int,
    cluster_rate: float = 0.5,
    neighbours: int = 5,
):
    """Decouple by class attention, cluster the inattentive tokens (DPC-kNN, attention-weighted means),
    merge as many attentive pairs by ToMe as there are clusters."""
    n = x.shape[0]
    patches = list(range(prefix, n))
    k = math.ceil(keep_rate * len(patches))
    ranked = sorted(patches, key=lambda j: (-cls_attn[j], j))
    attentive, inattentive = sorted(ranked[:k]), sorted(ranked[k:])
    c = min(math.ceil(cluster_rate * len(inattentive)), k // 2)
    front = list(range(prefix))
    if c == 0:
        keep = front + attentive
        return torch.stack([x[i] for i in keep]), torch.tensor([float(size[i]) for i in keep])
    assignment, centres = density_peaks(x[inattentive], c, neighbours)
    rows, keys, sizes = [x[i] for i in front], [metric[i] for i in front], [float(size[i]) for i in front]
    for g in range(c):
        members = [inattentive[t] for t in range(len(inattentive)) if assignment[t] == g]
        weight = sum(cls_attn[i] for i in members)
        rows.append(sum(cls_attn[i] * x[i] for i in members) / weight)
        keys.append(sum(cls_attn[i] * metric[i] for i in members) / weight)
        sizes.append(sum(float(size[i]) for i in members))
    rows += [x[i] for i in attentive]
    keys += [metric[i] for i in attentive]
    sizes += [float(size[i]) for i in attentive]
    rows, sizes = tome_step(rows, keys, sizes, c, prefix + c)
    return torch.stack(rows), torch.tensor(sizes)
