"""Naive loops for LVLM_CSP on one image, written from the paper's three stages and the rules
tokenreduce documents (uniform or seeded random representatives, nearest by cosine similarity,
scatter as a residual update, prune by the last token's attention), sharing no code with tokenreduce."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def representatives(n: int, count: int, clustering: str, seed: int = 0) -> list[int]:
    if clustering == "uniform":
        return [i * (n // count) for i in range(count)]
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def clusters(tokens: Tensor, reps: list[int]) -> list[int]:
    """Per token of ``tokens [N, D]``, the index in ``reps`` of its most cosine-similar representative."""

    def cos(i: int, j: int) -> float:
        a, b = tokens[i].tolist(), tokens[j].tolist()
        dot = sum(x * y for x, y in zip(a, b))
        return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-12)

    out = []
    for i in range(tokens.shape[0]):
        if i in reps:
            out.append(reps.index(i))
            continue
        sims = [cos(i, r) for r in reps]
        out.append(max(range(len(reps)), key=lambda c: (sims[c], -c)))
    return out


def scatter(before: Tensor, reps: list[int], assign: list[int], after: Tensor) -> Tensor:
    """Every token back: a representative takes its output ``after [K, D]``, any other token its own
    ``before [N, D]`` plus its representative's update."""
    rows = []
    for i in range(before.shape[0]):
        c = assign[i]
        rows.append(after[c] if i == reps[c] else before[i] + (after[c] - before[reps[c]]))
    return torch.stack(rows)


def last_token_attention(q: Tensor, k: Tensor, scale: float) -> list[float]:
    """The last query's softmax attention over every key (it sees them all), mean over heads:
    ``q``/``k [H, L, D]``."""
    heads, length = q.shape[0], q.shape[1]
    mean = [0.0] * length
    for h in range(heads):
        logits = [float(q[h, -1] @ k[h, j]) * scale for j in range(length)]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        for j in range(length):
            mean[j] += weights[j] / sum(weights) / heads
    return mean


def prune(scores: list[float], keep: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])
