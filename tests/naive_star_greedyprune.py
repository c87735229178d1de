"""Naive oracles of STAR's and GreedyPrune's selection rules, written from the spec with Python loops
(no code shared with tokenreduce): each takes plain per-token numbers of one image and returns the kept
indices (within the image), in order."""

from __future__ import annotations

import math


def star_scores(hidden: list[list[float]], queries: list[int], start: int, candidates: list[int]) -> dict[int, float]:
    """One STAR stage on one sequence's hidden states: every query position ``q`` spreads a softmax of
    ``h_q . h_i / sqrt(d)`` over the image's ``candidates`` (indices from ``start``); a candidate's score
    is what it receives, averaged over the queries."""
    d = len(hidden[0])
    scores = dict.fromkeys(candidates, 0.0)
    for q in queries:
        logits = {c: sum(a * b for a, b in zip(hidden[q], hidden[start + c])) / math.sqrt(d) for c in candidates}
        top = max(logits.values())
        total = sum(math.exp(v - top) for v in logits.values())
        for c in candidates:
            scores[c] += math.exp(logits[c] - top) / total / len(queries)
    return scores


def is_top(scores: dict[int, float], kept: list[int], keep: int, tol: float = 1e-6) -> bool:
    """``kept`` is ``keep`` of the candidates, in order, none scoring below a dropped one (up to ``tol``:
    scores computed in float32 and here in float64 may order near-ties differently)."""
    dropped = [c for c in scores if c not in kept]
    lowest = min(scores[c] for c in kept)
    return len(kept) == keep and kept == sorted(kept) and all(scores[c] <= lowest + tol for c in dropped)


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return 1.0 - dot / norms


def greedy_prune(saliency: list[float], features: list[list[float]], keep: int, tau: float) -> list[int]:
    """GreedyPrune: tokens by decreasing saliency (earlier first on ties), each taken if its cosine
    similarity to every token taken is at most ``tau``, until ``keep``; then the most salient others."""
    order = sorted(range(len(saliency)), key=lambda i: (-saliency[i], i))
    picked = []
    for i in order:
        if len(picked) < keep and all(1.0 - cosine_distance(features[i], features[j]) <= tau for j in picked):
            picked.append(i)
    picked += [i for i in order if i not in picked][: keep - len(picked)]
    return sorted(picked)
