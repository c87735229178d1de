"""HoliTom's merging before the LLM and inside it, written from its description with Python loops (float64), sharing
no code with the method: the oracle the vectorised ``holitom`` must match."""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from naive_fastvid import cosine, dpc_scores


def windows(static: list[list[bool]], frames: int, max_window: int | None) -> list[tuple[int, int]]:
    """The split maximising sum of (positions static through a window) * (length - 1): frame ``i`` ends a
    window alone unless a longer one (shortest first) does strictly better."""

    def saved(first: int, last: int) -> int:
        still = sum(all(static[t][q] for t in range(first, last)) for q in range(len(static[0])))
        return still * (last - first)

    @cache
    def best(last: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        if last < 0:
            return 0, ()
        value, split = best(last - 1)
        split = (*split, (last, last))
        for length in range(2, min(last + 1, max_window or frames) + 1):
            before, head = best(last - length)
            if before + saved(last - length + 1, last) > value:
                value, split = before + saved(last - length + 1, last), (*head, (last - length + 1, last))
        return value, split

    return list(best(frames - 1)[1])


def clusters(feats: list[Tensor], count: int, neighbours: int, beta: float | None) -> list[tuple[int, Tensor]]:
    """DPC-kNN: (centre, merged value) per cluster, centres best-scored first."""
    d = feats[0].shape[0]
    scores = dpc_scores(feats, min(neighbours, count))
    centres = sorted(range(len(feats)), key=lambda i: (-scores[i], i))[:count]
    groups: list[list[int]] = [[] for _ in centres]
    for i, f in enumerate(feats):
        if i in centres:
            groups[centres.index(i)].append(i)
            continue
        dist = [float((f - feats[c]).norm()) / math.sqrt(d) for c in centres]
        groups[dist.index(min(dist))].append(i)
    out = []
    for c, group in zip(centres, groups):
        others = [feats[i] for i in group if i != c]
        if beta is None or not others:
            value = sum(feats[i] for i in group) / len(group)
        else:
            value = beta * feats[c] + (1 - beta) * sum(others) / len(others)
        out.append((c, value))
    return out


def holitom(
    video: Tensor,
    frames: int,
    count: int,
    tau: float = 0.8,
    neighbours: int = 7,
    beta: float | None = 0.6,
    contextual: float = 0.0,
    max_window: int | None = None,
) -> tuple[list[int], Tensor]:
    """One video ``[T * P, D]`` -> (the token each output inherits its position from, in order; outputs)."""
    x = video.double()
    n, d = x.shape
    p = n // frames
    tok = [[x[f * p + i] for i in range(p)] for f in range(frames)]
    static = [[cosine(tok[t][q], tok[t + 1][q]) > tau for q in range(p)] for t in range(frames - 1)]

    def parts_of(split: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
        parts = []
        for first, last in split:
            still = [q for q in range(p) if last > first and all(static[t][q] for t in range(first, last))]
            if still:
                parts.append((list(range(first, last + 1)), still))
            moving = [q for q in range(p) if q not in still]
            if moving:
                parts += [([f], moving) for f in range(first, last + 1)]
        return parts

    parts = parts_of(windows(static, frames, max_window))
    if count > sum(len(at) for _, at in parts):
        parts = parts_of([(f, f) for f in range(frames)])
    sizes = [len(at) for _, at in parts]
    exact = [count * s / sum(sizes) for s in sizes]
    shares = [math.floor(e) for e in exact]
    for i in sorted(range(len(parts)), key=lambda i: (-(exact[i] - shares[i]), i))[: count - sum(shares)]:
        shares[i] += 1
    outputs: dict[int, Tensor] = {}
    for (fs, at), share in zip(parts, shares):
        feats = [sum(tok[f][q] for f in fs) / len(fs) for q in at]
        taken: list[int] = []
        if len(fs) == 1:
            f = fs[0]
            received = [0.0] * p
            for q in range(p):
                logits = [float(tok[f][q] @ tok[f][r]) / math.sqrt(d) for r in range(p)]
                top = max(logits)
                w = [math.exp(v - top) for v in logits]
                for r in range(p):
                    received[r] += w[r] / sum(w) / p
            taken = sorted(range(len(at)), key=lambda j: (-received[at[j]], j))[: round(share * (1 - contextual))]
            for j in taken:
                outputs[f * p + at[j]] = tok[f][at[j]]
        free = [j for j in range(len(at)) if j not in taken]
        if share > len(taken):
            for c, value in clusters([feats[j] for j in free], share - len(taken), neighbours, beta):
                outputs[fs[0] * p + at[free[c]]] = value
    index = sorted(outputs)
    return index, torch.stack([outputs[i] for i in index])


def inner_merge(hidden: Tensor, attention: Tensor, count: int) -> tuple[list[int], Tensor]:
    """One video's span in the LLM: ``hidden [L, D]`` (the merging layer's input) and the last prompt token's
    attention ``[L]`` -> (the kept tokens, in order; their states after every other token, in order, halved
    into the most cosine-similar one: ``h <- (h + h') / 2``)."""
    h = hidden.double().clone()
    kept = sorted(sorted(range(len(h)), key=lambda i: (-float(attention[i]), i))[:count])
    for i in range(len(h)):
        if i not in kept:
            sims = [cosine(hidden[i].double(), hidden[j].double()) for j in kept]
            target = kept[sims.index(max(sims))]
            h[target] = (h[target] + h[i]) / 2
    return kept, h[kept]
