"""Dense (many-to-many) selections: each removed or merged token is spread over several outputs
(Vote&Mix's similarity voting and mixing, Token Transforming's soft transformation to target tokens)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenreduce.core.select import stable_order
from tokenreduce.core.selection import Selection, mix


def _unit(metric: Tensor) -> Tensor:
    metric = metric.detach().float()  # the weights are decisions, as ToMe's matching: no gradient flows into them
    return metric / metric.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def _with_prefix(block: Tensor, num_prefix: int) -> Tensor:
    """``block [B, R, S]`` (non-prefix rows and columns) with ``num_prefix`` identity rows and columns in front."""
    p = num_prefix
    out = torch.nn.functional.pad(block, (p, 0, p, 0))
    if p:
        out[:, :p, :p] = torch.eye(p, device=block.device)
    return out


def _largest(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``values.topk(k, dim=-1)`` for a small ``k`` by ``k`` maxima: several times faster on CPU."""
    top, where = [], []
    for _ in range(k):
        best, index = values.max(dim=-1, keepdim=True)
        top.append(best)
        where.append(index)
        values = values.scatter(-1, index, -math.inf)
    return torch.cat(top, dim=-1), torch.cat(where, dim=-1)


def vote_and_mix(metric: Tensor, num_remove: int, num_prefix: int = 0, temperature: float = 1.0) -> Selection:
    """Vote&Mix (Peng et al., ICME 2025): remove the ``num_remove`` most voted-for tokens and mix them into
    the others.

    Args:
        metric: ``[B, N, D]`` per-token features compared by cosine similarity.
        num_remove: tokens to remove, ``0 <= num_remove < N - num_prefix``.
        num_prefix: leading tokens (class, distillation, register) that neither vote, are voted for,
            nor take part in the mixing: they stay as they are, in front.
        temperature: the mixing softmax is taken over ``similarity / temperature``.

    Every other token votes for its most similar other token, with its similarity as the vote's weight;
    a token's score is the sum of the votes it receives. The ``num_remove`` highest-scored tokens are
    removed (equal scores: the earlier token first); each removed token ``s`` is spread over the kept
    tokens ``k`` with weights ``w[s, k] = softmax over k of sim[s, k] / temperature`` and added to them:
    ``out[k] = x[k] + sum_s w[s, k] x[s]`` (not renormalised). Outputs are the prefix, then the kept
    tokens in position order; a dense selection whose columns sum to 1, so sizes keep their total.
    """
    b, n = metric.shape[:2]
    p, m = num_prefix, metric.shape[1] - num_prefix
    if not 0 <= num_remove < max(m, 1):
        raise ValueError(f"num_remove must be in [0, {max(m - 1, 0)}] for {n} tokens with {p} prefix tokens, got {num_remove}")
    unit = _unit(metric[:, p:])
    sim = unit @ unit.transpose(1, 2)  # [B, m, m]
    eye = torch.eye(m, dtype=torch.bool, device=metric.device)
    best, choice = sim.masked_fill(eye, -math.inf).max(dim=-1)
    votes = torch.zeros(b, m, device=metric.device).scatter_add_(1, choice, best)
    order = stable_order(votes)
    removed, kept = order[:, :num_remove], order[:, num_remove:].sort(dim=1).values
    k = kept.shape[1]
    pair = sim.gather(1, removed[..., None].expand(-1, -1, m)).gather(2, kept[:, None, :].expand(-1, num_remove, -1))
    weight = (pair / temperature).softmax(dim=-1)  # [B, s, K]
    block = torch.zeros(b, k, m, device=metric.device).scatter(2, kept[..., None], 1.0)
    block = block.scatter(2, removed[:, None, :].expand(-1, k, -1), weight.transpose(1, 2))
    index = torch.cat([torch.arange(p, device=metric.device).expand(b, -1), kept + p], dim=1)
    return mix(_with_prefix(block, p), index=index)


def transform_to_targets(
    metric: Tensor,
    importance: Tensor,
    num_targets: int,
    num_prefix: int = 0,
    spread: int = 3,
    temperature: float = 0.1,
    size: Tensor | None = None,
) -> Selection:
    """A many-to-many transformation ``X' = T X`` onto the ``num_targets`` most important tokens.

    Args:
        metric: ``[B, N, D]`` per-token features compared by cosine similarity.
        importance: ``[B, N - num_prefix]`` one score per non-prefix token; the highest become targets.
        num_targets: non-prefix outputs, ``1 <= num_targets <= N - num_prefix``.
        num_prefix: leading tokens kept as they are, in front.
        spread: each other token feeds its ``spread`` most similar targets (``1 <= spread <= num_targets``).
        temperature: its weights there are ``softmax(similarity / temperature)`` over those targets.
        size: ``[B, N, 1]`` original tokens per token (``None``: all 1).

    The assignment ``A [B, N, num_prefix + num_targets]`` sends a prefix or target token wholly to its
    own output and every other token to its ``spread`` nearest targets with those weights (rows sum to
    1). Output ``j`` is the size-weighted mean of everything sent to it, ``T[j, i] = A[i, j] size[i] /
    sum_i A[i, j] size[i]``; sizes follow ``A`` (``size'[j] = sum_i A[i, j] size[i]``, so the total is
    kept) and :meth:`~Selection.unmerge` rebuilds token ``i`` as ``sum_j A[i, j] out[j]``. Outputs are
    the prefix, then the targets in position order.
    """
    b, n, d = metric.shape
    p, m = num_prefix, n - num_prefix
    if not 1 <= num_targets <= m:
        raise ValueError(f"num_targets must be in [1, {m}] for {n} tokens with {p} prefix tokens, got {num_targets}")
    if not 1 <= spread <= num_targets:
        raise ValueError(f"spread must be in [1, {num_targets}] (the targets), got {spread}")
    device = metric.device
    targets = importance.detach().topk(num_targets, dim=1).indices.sort(dim=1).values  # [B, T] among the non-prefix tokens
    unit = _unit(metric[:, p:])
    sim = unit @ unit.gather(1, targets[..., None].expand(-1, -1, d)).transpose(1, 2)  # [B, m, T]
    nearest, which = _largest(sim, spread)
    assign = torch.zeros(b, m, num_targets, device=device).scatter(2, which, (nearest / temperature).softmax(dim=-1))
    own = torch.eye(num_targets, device=device).expand(b, -1, -1)
    assign = assign.scatter(1, targets[..., None].expand(-1, -1, num_targets), own)  # a target's row: itself only
    assign = _with_prefix(assign.transpose(1, 2), p)  # [B, p + T, N]: A transposed
    mass = assign if size is None else assign * size[:, None, :, 0].detach().float()
    matrix = mass / mass.sum(dim=-1, keepdim=True)
    index = torch.cat([torch.arange(p, device=device).expand(b, -1), targets + p], dim=1)
    return mix(matrix, index=index, size_matrix=assign, inverse=assign.transpose(1, 2))
