"""Naive oracles for G-Search and P-Sigmoid, written from the spec and the paper (arXiv 2412.00556): plain
Python loops over layers, tokens and heads; they share no code with tokenreduce."""

from __future__ import annotations

import math

import torch


def sigmoid_schedule(slope: float, midpoint: float, depth: int) -> list[float]:
    """P-Sigmoid's keep rate per layer: 1 at layer 0, then ``1 / (1 + e^(slope (l / (depth - 1) - midpoint)))``."""
    rates = [1.0]
    for layer in range(1, depth):
        x = layer / (depth - 1)
        rates.append(1.0 / (1.0 + math.exp(slope * (x - midpoint))))
    return rates


def kept_per_layer(rates: list[float], tokens: int) -> list[int]:
    """Tokens an image of ``tokens`` keeps at each layer: ``max(1, round(rate * tokens))``."""
    return [max(1, int(round(r * tokens))) for r in rates]


def pruning_layers(rates: list[float]) -> list[int]:
    """The layers where the rate falls below the previous layer's: only there are tokens dropped."""
    return [layer for layer in range(1, len(rates)) if rates[layer] < rates[layer - 1]]


def rank_by_last_token(probs: torch.Tensor, start: int, last: int, candidates: list[int], keep: int) -> list[int]:
    """One image, one layer: ``probs [H, L, L]`` its attention probabilities; the ``keep`` candidates
    (indices in the image's span from ``start``) the prompt's ``last`` token attends to most, summed
    over heads (the same order as the mean), in their original order."""
    score = {}
    for c in candidates:
        total = 0.0
        for h in range(probs.shape[0]):
            total += float(probs[h, last, start + c])
        score[c] = total
    chosen = sorted(candidates, key=lambda c: (-score[c], c))[:keep]
    return sorted(chosen)


def relative_change(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean over rows of ``||got - want|| / ||want||`` (``[B, V]`` logits)."""
    total = 0.0
    for row in range(want.shape[0]):
        diff = sum(float(x) ** 2 for x in (got[row] - want[row]).tolist()) ** 0.5
        norm = sum(float(x) ** 2 for x in want[row].tolist()) ** 0.5
        total += diff / norm
    return total / want.shape[0]
