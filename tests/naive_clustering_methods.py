"""Naive oracles for ``kmedoids``, ``dpc_knn`` and ``token_pooling``, written from the spec, one sample at a
time, with Python loops over tokens and float64 distances. They share no code with tokenreduce (not even
its hash), and a hand-written ViT forward calls them at the start or the end of each block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def distances(x: Tensor) -> list[list[float]]:
    """Euclidean distances between the rows of ``x [P, C]``, pair by pair in float64."""
    rows = [r.double() for r in x]
    n = len(rows)
    return [[0.0 if i == j else float(((rows[i] - rows[j]) ** 2).sum().sqrt()) for j in range(n)] for i in range(n)]


def by_weight(weight: list[float], k: int) -> list[int]:
    """The ``k`` positions of highest weight, highest first, ties to the lower position."""
    return sorted(range(len(weight)), key=lambda i: (-weight[i], i))[:k]


def assign(dist: list[list[float]], centres: list[int]) -> list[int]:
    """Each token's cluster: its own when it is a centre, else the nearest centre (the first on ties)."""
    out = []
    for i in range(len(dist)):
        if i in centres:
            out.append(centres.index(i))
        else:
            out.append(min(range(len(centres)), key=lambda c: (dist[i][centres[c]], c)))
    return out


def mix32(value: int) -> int:
    """A 32-bit integer hash (multiply, xor-shift), written out: the seeded first medoid."""
    mask = 0xFFFFFFFF
    for _ in range(2):
        value = ((value ^ (value >> 16)) * 0x45D9F3B) & mask
    return value ^ (value >> 16)


def seeded_position(count: int, key: int) -> int:
    """The position of largest hash among ``count``: ``equal_weight``'s first medoid for ``key``."""
    scores = [mix32((i * 2654435761 + (key & 0xFFFFFFFF)) & 0xFFFFFFFF) for i in range(count)]
    return max(range(count), key=lambda i: (scores[i], -i))


def haurum_kmedoids(
    x: Tensor, weight: list[float] | None, k: int, iterations: int, cost: str = "all", first: int = 0
) -> tuple[list[int], list[int]]:
    """Haurum et al.'s K-Medoids on one sample's patch tokens ``x [P, C]``: ``(medoids, assignment)``.

    Start: top-``k`` by weight; without weights, greedy from ``first``, adding the token with the
    largest max-distance to those chosen. Each round: assign, then per cluster the member of lowest
    ``w_i * sum_j d(i, j)``, ``j`` over all tokens (``cost="all"``) or the cluster."""
    p = x.shape[0]
    dist = distances(x)
    if weight is None:
        medoids = [first]
        while len(medoids) < k:
            rest = [t for t in range(p) if t not in medoids]
            medoids.append(max(rest, key=lambda t: (max(dist[t][m] for m in medoids), -t)))
        weight = [1.0] * p
    else:
        medoids = by_weight(weight, k)
    for _ in range(iterations):
        cluster = assign(dist, medoids)
        for c in range(k):
            members = [i for i in range(p) if cluster[i] == c]
            over = range(p) if cost == "all" else members
            medoids[c] = min(members, key=lambda i: (weight[i] * sum(dist[i][j] for j in over), i))
    return medoids, assign(dist, medoids)


def dpc_knn(x: Tensor, k: int, neighbours: int) -> tuple[list[int], list[int]]:
    """DPC-kNN on one sample's patch tokens ``x [P, C]``: ``(centres, assignment)``."""
    p, c = x.shape
    dist = [[d / math.sqrt(c) for d in row] for row in distances(x)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:neighbours]) / neighbours) for row in dist]
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(p):
        denser = [j for j in range(p) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min((dist[i][j] for j in denser), default=largest))
    score = [delta[i] * density[i] for i in range(p)]
    centres = by_weight(score, k)
    return centres, assign(dist, centres)


def pooling_kmedoids(x: Tensor, weight: list[float], init: list[int], iterations: int) -> tuple[list[int], list[int]]:
    """Token Pooling's weighted K-Medoids: per cluster the member ``i`` of lowest
    ``sum_{j in cluster} w_j ||x_i - x_j||^2``. ``(medoids, assignment)``."""
    p = x.shape[0]
    dist = distances(x)
    medoids = list(init)
    for _ in range(iterations):
        cluster = assign(dist, medoids)
        for c in range(len(medoids)):
            members = [i for i in range(p) if cluster[i] == c]
            medoids[c] = min(members, key=lambda i: (sum(weight[j] * dist[i][j] ** 2 for j in members), i))
    return medoids, assign(dist, medoids)


def pooling_kmeans(x: Tensor, weight: list[float], init: list[int], iterations: int) -> tuple[list[int], Tensor]:
    """Token Pooling's weighted K-Means (the seeds stay in their clusters): ``(assignment, centres [K, C])``."""
    p, k = x.shape[0], len(init)
    rows = [r.double() for r in x]
    centres = [rows[i] for i in init]
    cluster = []
    for _ in range(iterations):
        cluster = []
        for i in range(p):
            if i in init:
                cluster.append(init.index(i))
            else:
                cluster.append(min(range(k), key=lambda c: (float(((rows[i] - centres[c]) ** 2).sum()), c)))
        for c in range(k):
            members = [i for i in range(p) if cluster[i] == c]
            total = sum(weight[i] for i in members)
            centres[c] = sum(rows[i] * (weight[i] / total) for i in members)
    return cluster, torch.stack(centres)


def clustered(t: Tensor, size: Tensor, prefix: int, assignment: list[int], outputs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The prefix tokens, then one output per cluster; sizes add up over each cluster."""
    sizes = [size[i] for i in range(prefix)]
    for c in range(len(outputs)):
        sizes.append(sum(size[prefix + i] for i in range(len(assignment)) if assignment[i] == c))
    rows = [t[i] for i in range(prefix)] + [o.to(t.dtype) for o in outputs]
    return torch.stack(rows), torch.stack(sizes)


def attention(attn, t: Tensor) -> tuple[Tensor, Tensor]:
    """A timm ``Attention`` written out for one sample ``t [N, C]``: (output, probs ``[H, N, N]``)."""
    n = t.shape[0]
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(t).reshape(n, 3, h, d).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(n, h * d)
    return attn.proj(attn.norm(out)), probs


def vit_forward(model, images: Tensor, start=None, end=None) -> Tensor:
    """A pre-norm timm ViT run sample by sample. ``start(layer, t, previous_probs, size)`` runs before
    block ``layer`` (``previous_probs``: the attention of the block before, ``None`` at block 0) and
    ``end(layer, t, probs, size)`` after it; each returns the new ``(t, size)``. Sizes weight average
    pooling. Distilled models average their two heads."""
    outs = []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for t in tokens:
            size = torch.ones(t.shape[0])
            probs = None
            for layer, blk in enumerate(model.blocks):
                if start is not None:
                    t, size = start(layer, t, probs, size)
                out, probs = attention(blk.attn, blk.norm1(t))
                t = t + blk.ls1(out)
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
                if end is not None:
                    t, size = end(layer, t, probs, size)
            t = model.norm(t)
            p = model.num_prefix_tokens
            if hasattr(model, "head_dist"):
                outs.append((model.head(t[0]) + model.head_dist(t[1])) / 2)
                continue
            if model.global_pool == "avg":
                pooled = (t[p:] * size[p:, None]).sum(0) / size[p:].sum()
            else:
                pooled = t[0]
            outs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outs)


def received(probs: Tensor) -> list[float]:
    """Attention each token receives, summed over heads and all queries: ``probs [H, N, N]`` -> ``[N]``."""
    n = probs.shape[-1]
    return [float(probs[:, :, j].double().sum()) for j in range(n)]
