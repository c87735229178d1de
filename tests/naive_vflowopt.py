"""Naive oracles for VFlowOpt, written from the spec's summary of the paper (arXiv 2508.05211): plain
Python loops over heads, features and tokens; they share no code with tokenreduce."""

from __future__ import annotations

import math

from torch import Tensor


def entropy(state: Tensor) -> float:
    """Shannon entropy (nats) of the softmax over one token's features ``state [D]``."""
    values = [float(v) for v in state.double()]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return -sum(e / total * math.log(e / total) for e in exps if e > 0)


def importance_rank(
    probs: Tensor, hidden: Tensor, start: int, last: int, candidates: list[int], keep: int, alpha: float
) -> list[int]:
    """One image, one stage: the ``keep`` candidates of highest (attention of the ``last`` token,
    summed over the heads of ``probs [H, L, L]``) x entropy(state) ** alpha, ``hidden [L, D]`` the
    stage layer's input; in their original order."""
    score = {}
    for c in candidates:
        attention = sum(float(probs[h, last, start + c]) for h in range(probs.shape[0]))
        score[c] = attention * entropy(hidden[start + c]) ** alpha
    return sorted(sorted(candidates, key=lambda c: (-score[c], c))[:keep])


def recycled(states: Tensor, kept: list[int]) -> list[Tensor]:
    """Each kept token of ``states [N, D]`` averaged with the dropped tokens whose most cosine-similar
    kept token it is (ties to the lowest kept index)."""

    def cosine(a: Tensor, b: Tensor) -> float:
        a, b = a.double(), b.double()
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    groups = {k: [k] for k in kept}
    for i in range(states.shape[0]):
        if i not in groups:
            best = max(kept, key=lambda k: (cosine(states[i], states[k]), -k))
            groups[best].append(i)
    return [sum(states[i].double() for i in groups[k]) / len(groups[k]) for k in kept]
