"""FastVID written from its description with Python loops (float64), sharing no code with the method:
the oracle the vectorised ``fastvid`` must match, token for token and value for value."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def dpc_scores(feats: list[Tensor], neighbours: int) -> list[float]:
    """Density * distance to the nearest denser token (the earlier one denser on equal density)."""
    n, d = len(feats), feats[0].shape[0]
    dist = [[float((a - b).norm()) / math.sqrt(d) if i != j else 0.0 for j, b in enumerate(feats)] for i, a in enumerate(feats)]
    density = []
    for i in range(n):
        nearest = sorted(dist[i])[: min(neighbours, n)]
        density.append(math.exp(-sum(v * v for v in nearest) / len(nearest)))
    largest = max(max(row) for row in dist)
    scores = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        scores.append((min(denser) if denser else largest) * density[i])
    return scores


def split_by_room(total: int, weights: list[float], room: list[int]) -> list[int]:
    """``total`` in proportion to ``weights`` (to ``room`` once no open part has weight), none above its room;
    floors, then one each to the largest remainders, the earlier first."""
    fixed = [r <= 0 for r in room]
    while True:
        rest = total - sum(r for r, f in zip(room, fixed) if f)
        w = [0.0 if f else wi for wi, f in zip(weights, fixed)]
        if sum(w) <= 0:
            w = [0.0 if f else float(r) for r, f in zip(room, fixed)]
        share = [float(r) if f else rest * wi / sum(w) for r, f, wi in zip(room, fixed, w)]
        over = [not f and s > r for s, r, f in zip(share, room, fixed)]
        if not any(over):
            break
        fixed = [f or o for f, o in zip(fixed, over)]
    out = [min(math.floor(s), r) for s, r in zip(share, room)]
    order = sorted(range(len(out)), key=lambda i: (-(share[i] - out[i]) if out[i] < room[i] else 1.0, i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def fastvid(
    video: Tensor,
    frames: int,
    count: int,
    segments: int = 8,
    tau: float = 0.9,
    context: float = 0.4,
    anchor_stride: int = 4,
    beta: float = 0.6,
    neighbours: int = 4,
) -> tuple[list[int], Tensor]:
    """One video ``[T * P, D]`` -> (the kept or anchor tokens, in order; their outputs ``[count, D]``)."""
    x = video.double()
    n, d = x.shape
    p = n // frames
    tok = [[x[f * p + i] for i in range(p)] for f in range(frames)]
    glob = [sum(tok[f]) / p for f in range(frames)]
    sims = [cosine(glob[f], glob[f + 1]) for f in range(frames - 1)]
    by_sim = sorted(range(frames - 1), key=lambda f: (sims[f], f))[: segments - 1]
    ends = sorted(set(by_sim) | {f for f in range(frames - 1) if sims[f] < tau}) + [frames - 1]
    budget = [count // frames + (1 if f < count % frames else 0) for f in range(frames)]
    salient = [b - math.floor(b * context) for b in budget]
    outputs: dict[int, Tensor] = {}
    rest = []
    for f in range(frames):
        logits = [float(glob[f] @ tok[f][i]) / math.sqrt(d) for i in range(p)]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        score = [w / sum(weights) for w in weights]
        chosen = sorted(range(p), key=lambda i: (-score[i], i))[: salient[f]]
        for i in chosen:
            outputs[f * p + i] = tok[f][i]
        rest.append([i for i in range(p) if i not in chosen])
    start = 0
    for end in ends:
        seg = list(range(start, end + 1))
        anchor_frames = [1.0 if (end - f) % anchor_stride == 0 else 0.0 for f in seg]
        shares = split_by_room(sum(budget[f] - salient[f] for f in seg), anchor_frames, [p - salient[f] for f in seg])
        pool = [f * p + i for f in seg for i in rest[f]]
        for f, share in zip(seg, shares):
            if not share:
                continue
            scores = dpc_scores([tok[f][i] for i in rest[f]], neighbours)
            best = sorted(range(len(rest[f])), key=lambda j: (-scores[j], j))[:share]
            anchors = [f * p + rest[f][j] for j in best]
            members: list[list[int]] = [[] for _ in anchors]
            for t in pool:
                if t in anchors:
                    members[anchors.index(t)].append(t)
                    continue
                sim = [cosine(x[t], x[a]) for a in anchors]
                members[sim.index(max(sim))].append(t)
            for a, group in zip(anchors, members):
                w = max(1 / (len(group) + 1), beta)
                outputs[a] = w * x[a] + (1 - w) * sum(x[t] for t in group) / len(group)
        start = end + 1
    index = sorted(outputs)
    return index, torch.stack([outputs[i] for i in index])
