"""Naive oracles for PiToMe, ToFu and DCT, written from the spec (vit-methods.md sections 4-6): one sample at
a time, Python loops over tokens and float64 arithmetic, no tokenreduce code.

Each step takes ``x [N, C]`` (the tokens at the hook), the head-averaged keys ``metric [N, D]`` where the
method needs them, and ``size [N]``, and returns the new ``(x, size)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _cosines(metric: Tensor, rows: list[int], cols: list[int]) -> dict[tuple[int, int], float]:
    unit = [v / v.norm() for v in metric.double()]
    return {(i, j): float(unit[i] @ unit[j]) for i in rows for j in cols}


def _best(sim: dict, i: int, candidates: list[int]) -> tuple[float, int]:
    """The most similar candidate to ``i`` (the first of equals) and its similarity."""
    k = max(range(len(candidates)), key=lambda t: (sim[i, candidates[t]], -t))
    return sim[i, candidates[k]], candidates[k]


def _weighted_groups(x: Tensor, size: Tensor, groups: list[list[int]]) -> tuple[list[Tensor], list[Tensor]]:
    rows, sizes = [], []
    for group in groups:
        w = sum(float(size[i]) for i in group)
        rows.append(sum(x[i].double() * float(size[i]) for i in group) / w)
        sizes.append(torch.tensor(w))
    return rows, sizes


def _elu(z: float) -> float:
    return z if z > 0 else math.exp(z) - 1.0


def pitome_step(
    x: Tensor, metric: Tensor, size: Tensor, ratio: float, margin: float, prefix: int, bipartite: bool
) -> tuple[Tensor, Tensor]:
    """One PiToMe block: ``r = floor(T - T * ratio)``; energy ``mean_j ELU(cos_ij - margin)``; the 2r
    highest-energy tokens pair off alternately and every A merges into its best B (``bipartite=False``),
    or all tokens pair off alternately and ToMe's r best edges merge (``bipartite=True``)."""
    n = x.shape[0]
    patches = list(range(prefix, n))
    t = len(patches)
    r = math.floor(t - t * ratio)
    if r == 0:
        return x, size
    sim = _cosines(metric, patches, patches)
    energy = {i: sum(_elu(sim[i, j] - margin) for j in patches) / t for i in patches}
    order = sorted(patches, key=lambda i: -energy[i])
    if bipartite:
        a_side, b_side, protected = order[0::2], order[1::2], []
    else:
        a_side, b_side, protected = order[: 2 * r : 2], order[1 : 2 * r : 2], order[2 * r :]
    best = {i: _best(sim, i, b_side) for i in a_side}
    ranked = sorted(a_side, key=lambda i: -best[i][0])
    merged, unmerged = ranked[:r], ranked[r:]
    groups = [[i] for i in range(prefix)] + [[i] for i in protected + unmerged]
    groups += [[j] + [i for i in merged if best[i][1] == j] for j in b_side]
    rows, sizes = _weighted_groups(x, size, groups)
    return torch.stack(rows).to(x.dtype), torch.stack(sizes).to(size.dtype)


def tofu_step(x: Tensor, metric: Tensor, size: Tensor, r: int, prefix: int, mode: str) -> tuple[Tensor, Tensor]:
    """One ToFu block after ToMe's matching (A = even, B = odd positions after the prefix, r best edges):
    ``mode`` "prune" drops the sources; "mlerp" rescales each group's size-weighted mean to the group's
    largest norm; "mean" keeps the weighted mean; "reference" rescales the plain mean by
    ``max norm / norm of the destination before merging``."""
    n = x.shape[0]
    a_side = [i for i in range(prefix, n) if i % 2 == 0]
    b_side = [j for j in range(prefix, n) if j % 2 == 1]
    sim = _cosines(metric, a_side, b_side)
    best = {i: _best(sim, i, b_side) for i in a_side}
    ranked = sorted(a_side, key=lambda i: -best[i][0])
    merged, kept = ranked[:r], ranked[r:]
    if prefix:
        kept = sorted(kept)
    rows = [x[i].double() for i in range(prefix)] + [x[i].double() for i in kept]
    sizes = [size[i] for i in range(prefix)] + [size[i] for i in kept]
    for j in b_side:
        group = [j] + ([] if mode == "prune" else [i for i in merged if best[i][1] == j])
        if mode == "reference":
            mean, w = sum(x[i].double() for i in group) / len(group), sum(float(size[i]) for i in group)
        else:
            (mean,), (w,) = _weighted_groups(x, size, [group])
        if len(group) > 1 and mode in ("mlerp", "reference"):
            largest = max(float(x[i].double().norm()) for i in group)
            divisor = float(mean.norm()) if mode == "mlerp" else float(x[j].double().norm())
            mean = mean / divisor * largest
        rows.append(mean)
        sizes.append(torch.as_tensor(w, dtype=size.dtype))
    return torch.stack(rows).to(x.dtype), torch.stack(sizes).to(size.dtype)


def _dct_basis(n: int, k: int, i: int) -> float:
    """Entry ``[k, i]`` of the orthonormal DCT-II of length ``n``."""
    scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
    return scale * math.cos(math.pi * (2 * i + 1) * k / (2 * n))


def dct_step(x: Tensor, size: Tensor, ratio: float, prefix: int) -> tuple[Tensor, Tensor]:
    """One DCT block end: the T patch tokens' first ceil(T * ratio) orthonormal DCT-II coefficients
    (per channel, by explicit cosine sums), inverted at that length. Each input's size goes to the output
    it contributes to the most."""
    n = x.shape[0]
    t = n - prefix
    m = math.ceil(t * ratio)
    if m == t:
        return x, size
    patches = [x[prefix + i].double() for i in range(t)]
    coeffs = [sum(_dct_basis(t, k, i) * patches[i] for i in range(t)) for k in range(m)]
    outputs = [sum(_dct_basis(m, k, j) * coeffs[k] for k in range(m)) for j in range(m)]
    weight = [[sum(_dct_basis(m, k, j) * _dct_basis(t, k, i) for k in range(m)) for i in range(t)] for j in range(m)]
    sizes = [0.0] * m
    for i in range(t):
        strongest = max(range(m), key=lambda j: (abs(weight[j][i]), -j))
        sizes[strongest] += float(size[prefix + i])
    rows = [x[i].double() for i in range(prefix)] + outputs
    new_size = [float(size[i]) for i in range(prefix)] + sizes
    return torch.stack(rows).to(x.dtype), torch.tensor(new_size, dtype=size.dtype)


def dct_restore(y: Tensor, num_inputs: int, prefix: int) -> Tensor:
    """The least-squares inverse of one :func:`dct_step` from ``num_inputs`` tokens: the kept coefficients
    taken again from the outputs, zero-padded and inverted at the input length."""
    t, m = num_inputs - prefix, y.shape[0] - prefix
    outs = [y[prefix + j].double() for j in range(m)]
    coeffs = [sum(_dct_basis(m, k, j) * outs[j] for j in range(m)) for k in range(m)]
    patches = [sum(_dct_basis(t, k, i) * coeffs[k] for k in range(m)) for i in range(t)]
    return torch.stack([y[i].double() for i in range(prefix)] + patches)
