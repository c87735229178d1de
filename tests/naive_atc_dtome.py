"""Naive oracles for ATC and DToMe (with DyMU's threshold calibration), written from the spec: Python loops
over tokens and clusters, one sample at a time, sharing no code with tokenreduce."""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_table(metric: Tensor) -> list[list[float]]:
    """``cos`` between every pair of rows of ``metric [N, D]`` as nested lists (float64)."""
    rows = [m.double() / m.double().norm() for m in metric]
    return [[float(a @ b) for b in rows] for a in rows]


def agglomerate(dist: list[list[float]], k: int, linkage: str) -> list[list[int]]:
    """Bottom-up clustering of ``len(dist)`` items into ``k`` clusters by the definition of each linkage:
    the distance of two clusters is the smallest (single), largest (complete) or mean (average) distance
    between their members, recomputed from the item distances at every step. Clusters are lists of item
    indices, sorted by their first item."""
    clusters = [[i] for i in range(len(dist))]
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                pairs = [dist[i][j] for i in clusters[a] for j in clusters[b]]
                d = {"single": min(pairs), "complete": max(pairs), "average": sum(pairs) / len(pairs)}[linkage]
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
        clusters.sort(key=lambda c: c[0])
    return clusters


def weighted_rows(x: Tensor, size: Tensor, groups: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Each group of rows of ``x [N, C]`` as its ``size``-weighted mean, and the summed sizes."""
    rows, sizes = [], []
    for group in groups:
        total = sum(float(size[i]) for i in group)
        rows.append(sum(x[i] * float(size[i]) for i in group) / total)
        sizes.append(torch.tensor(total))
    return torch.stack(rows), torch.stack(sizes)


def atc_step(x: Tensor, metric: Tensor, size: Tensor, clusters: int, prefix: int, linkage: str) -> tuple[Tensor, Tensor]:
    """One ATC step on one sample: the tokens after ``prefix`` clustered into ``clusters`` on ``1 - cos`` of
    ``metric [N, D]``; outputs the prefix tokens, then each cluster's size-weighted mean (in the order of
    its first token)."""
    n = x.shape[0]
    cos = cosine_table(metric[prefix:])
    dist = [[1.0 - c for c in row] for row in cos]
    groups = [[prefix + i for i in c] for c in agglomerate(dist, clusters, linkage)]
    return weighted_rows(x, size, [[i] for i in range(prefix)] + groups) if n else (x, size)


def atc_clusters(num_tokens: int, prefix: int, r: int, exact: bool = False) -> int:
    """The reference's cluster count: ``T - min(r, T - P)`` of the ``T - P`` non-prefix tokens (``exact``:
    ``T - P - r``); all of them when ``r`` is 0."""
    if r == 0:
        return num_tokens - prefix
    if exact:
        return num_tokens - prefix - r
    return min(num_tokens - prefix, num_tokens - min(r, num_tokens - prefix))


def edges(metric: Tensor, prefix: int) -> dict[int, tuple[float, int]]:
    """ToMe's edges on one sample: every A token (even position, not prefix) to its most similar B token
    (odd position, not prefix) as ``{a: (similarity, b)}``; the first of equal partners wins."""
    cos = cosine_table(metric)
    n = metric.shape[0]
    out = {}
    for a in range(0, n, 2):
        if a < prefix:
            continue
        best = None
        for b in range(1, n, 2):
            if b >= prefix and (best is None or cos[a][b] > best[0]):
                best = (cos[a][b], b)
        if best is not None:
            out[a] = best
    return out


def merge_sources(x: Tensor, size: Tensor, prefix: int, merged: dict[int, int]) -> tuple[Tensor, Tensor]:
    """The sample's tokens after the A tokens ``merged = {a: b}`` joined their B tokens: prefix tokens,
    the other A tokens in position order, then the B tokens in position order (each a size-weighted mean)."""
    n = x.shape[0]
    kept_a = [a for a in range(0, n, 2) if a >= prefix and a not in merged]
    groups = [[i] for i in range(prefix)] + [[a] for a in kept_a]
    for b in range(1, n, 2):
        if b >= prefix:
            groups.append([b] + sorted(a for a, to in merged.items() if to == b))
    return weighted_rows(x, size, groups)


def dtome_step(
    x: Tensor, metric: Tensor, size: Tensor, threshold: float | None, prefix: int, max_r: int | None = None
) -> tuple[Tensor, Tensor]:
    """One DToMe step on one sample: every edge more similar than ``threshold`` merges, at most half of the
    non-prefix tokens and at most ``max_r``, the most similar first."""
    if threshold is None:
        return x, size
    best = edges(metric, prefix)
    cap = (x.shape[0] - prefix) // 2 if max_r is None else min(max_r, (x.shape[0] - prefix) // 2)
    ranked = sorted(best, key=lambda a: (-best[a][0], a))[:cap]
    merged = {a: best[a][1] for a in ranked if best[a][0] > threshold}
    if not merged:  # nothing merges: the tokens stay as they are, in their order
        return x, size
    return merge_sources(x, size, prefix, merged)


def attention(attn, t: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """A timm ``Attention`` on one sample with proportional attention: (output, keys ``[H, N, D]``)."""
    n = t.shape[0]
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(t).reshape(n, 3, h, d).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale + size.log()).softmax(dim=-1)
    return attn.proj(attn.norm((probs @ v).transpose(0, 1).reshape(n, h * d))), k


def calibrate_lockstep(model, batches: list[Tensor], r: list[int]) -> list[float | None]:
    """DyMU's calibration on a pre-norm timm ViT, the images of a batch run block by block side by side: in
    block ``i`` the ``r[i] * B`` most similar edges of all images together merge (``r[i]`` at most half the
    longest image's mergeable tokens). The block's threshold for the batch is the similarity at place
    ``r[i] * B`` (from 0) of all ``B * ceil(longest / 2)`` A rows ranked together, rows without an edge
    (prefix rows, and the rows shorter images lack) last at -inf, at least 0. Thresholds are averaged over
    batches (``None``: never found)."""
    prefix = model.num_prefix_tokens
    found: list[list[float]] = [[] for _ in r]
    with torch.no_grad():
        for images in batches:
            tokens = list(model.norm_pre(model._pos_embed(model.patch_embed(images))))
            sizes = [torch.ones(t.shape[0]) for t in tokens]
            for layer, blk in enumerate(model.blocks):
                metrics = []
                for s, t in enumerate(tokens):
                    out, k = attention(blk.attn, blk.norm1(t), sizes[s])
                    tokens[s] = t + blk.ls1(out)
                    metrics.append(k.mean(0))
                longest = max(t.shape[0] for t in tokens)
                step = min(r[layer], (longest - prefix) // 2)
                if step > 0:
                    per_image = [edges(m, prefix) for m in metrics]
                    ranked = []
                    for s, best in enumerate(per_image):
                        ranked += [(sim, s, a) for a, (sim, _) in best.items()]
                        ranked += [(float("-inf"), s, None)] * ((longest + 1) // 2 - len(best))
                    ranked.sort(key=lambda e: -e[0])
                    place = min(step * len(tokens), len(ranked) - 1)
                    found[layer].append(max(ranked[place][0], 0.0))
                    for s in range(len(tokens)):
                        chosen = [a for sim, img, a in ranked[: step * len(tokens)] if img == s and a is not None]
                        merged = {a: per_image[s][a][1] for a in chosen}
                        tokens[s], sizes[s] = merge_sources(tokens[s], sizes[s], prefix, merged)
                for s, t in enumerate(tokens):
                    tokens[s] = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return [sum(v) / len(v) if v else None for v in found]
