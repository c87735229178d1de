"""Diversity-driven selection: greedy max-min subsets (DivPrune, Alvar et al., CVPR 2025)."""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_distance(x: Tensor) -> Tensor:
    """``1 - cos`` between all token pairs of ``x [B, N, D]``: ``[B, N, N]`` in float32."""
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return 1.0 - unit @ unit.transpose(-1, -2)


def max_min_subset(x: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` of a greedy max-min diverse subset of the tokens of ``x [B, N, D]``, in the
    order they were picked.

    The first pick is the token farthest from its nearest neighbour (the largest second-smallest
    distance in its column, the smallest being its distance to itself); each next pick maximises its
    distance to the nearest token already picked. Ties go to the lowest index.
    """
    b, n = x.shape[:2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} tokens, got {k}")
    dist = cosine_distance(x)
    rows = torch.arange(b, device=x.device)
    first = dist.topk(min(2, n), dim=1, largest=False).values[:, -1].argmax(dim=1)
    picked = [first]
    nearest = dist[rows, first]  # [B, N] distance of every token to the picked set
    for _ in range(k - 1):
        nxt = nearest.argmax(dim=1)
        picked.append(nxt)
        nearest = torch.minimum(nearest, dist[rows, nxt])
    return torch.stack(picked, dim=1)


def max_sum_subset(x: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` of a greedy max-sum diverse subset of the tokens of ``x [B, N, D]`` (cosine
    distance), in the order they were picked.

    The first pick is the token with the largest summed distance to all tokens; each next pick is the
    token not yet picked whose summed distance to the picked ones is largest. Ties go to the lowest index.
    """
    b, n = x.shape[:2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} tokens, got {k}")
    dist = cosine_distance(x)
    rows = torch.arange(b, device=x.device)
    first = dist.sum(dim=1).argmax(dim=1)
    picked = [first]
    taken = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    taken[rows, first] = True
    total = dist[rows, first]  # [B, N] summed distance of every token to the picked set
    for _ in range(k - 1):
        nxt = torch.where(taken, -torch.inf, total).argmax(dim=1)
        picked.append(nxt)
        taken[rows, nxt] = True
        total = total + dist[rows, nxt]
    return torch.stack(picked, dim=1)


def salient_dissimilar_subset(saliency: Tensor, x: Tensor, k: int, tau: float) -> Tensor:
    """Indices ``[k]``, in pick order, of the greedy solution of "maximise the summed ``saliency [N]``
    of ``k`` tokens of ``x [N, D]`` whose pairwise cosine similarity is at most ``tau``": tokens are
    taken in decreasing saliency (ties: the earlier token), each only if it is within ``tau`` of
    every token taken so far; if fewer than ``k`` pass, the most salient of the others fill up."""
    n = saliency.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} tokens, got {k}")
    order = saliency.float().sort(descending=True, stable=True).indices
    conflict = (1.0 - cosine_distance(x[None])[0]) > tau  # [N, N]
    blocked = torch.zeros(n, dtype=torch.bool, device=x.device)
    picked: list[int] = []
    for i in order.tolist():
        if not blocked[i]:
            picked.append(i)
            if len(picked) == k:
                break
            blocked |= conflict[i]
            blocked[i] = True
    chosen = set(picked)
    picked += [i for i in order.tolist() if i not in chosen][: k - len(picked)]
    return torch.tensor(picked, device=x.device)


def greedy_dpp(kernel: Tensor, k: int, eps: float = 1e-5) -> Tensor:
    """Indices ``[B, k]``, in pick order, of the greedy MAP of a determinantal point process with the
    positive semi-definite ``kernel [B, N, N]``: each pick maximises ``log det`` of the picked
    submatrix, that is the token's conditional gain ``L_jj - L_jS L_SS^-1 L_Sj`` (the fast greedy of
    Chen, Zhang and Zhou, NeurIPS 2018, by incremental Cholesky rows). Ties go to the lowest index.

    Once no token left gains more than ``eps`` times the row's largest diagonal entry (the picked ones
    span the kernel's rank, up to float32 rounding), the rest follow by their diagonal ``L_jj`` in
    decreasing order. Computed in float32; ``1 <= k <= N``."""
    b, n = kernel.shape[:2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} tokens, got {k}")
    kernel = kernel.float()
    rows = torch.arange(b, device=kernel.device)
    diag = kernel.diagonal(dim1=1, dim2=2)
    gain = diag.clone()  # [B, N] each token's conditional gain given the picks so far
    floor = eps * diag.amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    chol = kernel.new_zeros(b, k, n)  # row t: the picks' incremental Cholesky factors, for every token
    taken = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
    picked = []
    for t in range(k):
        live = ~taken & (gain > floor)
        by_gain = torch.where(live, gain, -torch.inf).argmax(dim=1)
        by_diag = torch.where(taken, -torch.inf, diag).argmax(dim=1)
        j = torch.where(live.any(dim=1), by_gain, by_diag)
        picked.append(j)
        taken[rows, j] = True
        e = (kernel[rows, j] - (chol[rows, :t, j][:, :, None] * chol[:, :t]).sum(dim=1)) / gain[rows, j].clamp(
            min=floor[:, 0]
        ).sqrt()[:, None]
        chol[:, t] = e
        gain = gain - e * e
    return torch.stack(picked, dim=1)
