"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) as a size-weighted merging selection."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenreduce.core.select import stable_order
from tokenreduce.core.selection import Selection


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 0, size: Tensor | None = None) -> Selection:
    """Merge the ``r`` tokens of set A most similar to their best partner in set B.

    Args:
        metric: ``[B, N, D]`` per-token features (ToMe: attention keys averaged over heads).
        r: tokens to remove, ``0 <= r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens (CLS, distillation, registers) that are never merged.
        size: ``[B, N, 1]`` original tokens per token; merges are means weighted by it (``None``: plain means).

    The sequence is split alternately (even positions -> A, odd -> B) and compared by cosine
    similarity, prefix rows of A and prefix columns of B masked out. Outputs are ordered
    ``[prefix tokens, unmerged A tokens, B tokens]``; a merged token takes the place of its B token.
    """
    b, n = metric.shape[:2]
    limit = (n - num_prefix) // 2
    if not 0 <= r <= limit:
        raise ValueError(f"r must be in [0, {limit}] for {n} tokens with {num_prefix} prefix tokens, got {r}")
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, bb = metric[:, ::2], metric[:, 1::2]
        scores = a @ bb.transpose(-1, -2)
        scores[:, :pa, :] = -math.inf
        scores[:, :, :pb] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[:, r:]  # A indices that stay
        src_idx = edge_idx[:, :r]  # A indices merged away
        dst_idx = node_idx.gather(1, src_idx)  # their B partners
        if num_prefix:
            # Prefix rows score -inf so they are the last edges; sorting puts them first to drop them.
            unm_idx = unm_idx.sort(dim=1)[0][:, pa:]

    device, rows = metric.device, torch.arange(b, device=metric.device)[:, None]
    n_a, n_b, n_unm = (n + 1) // 2, n // 2, unm_idx.shape[1]
    b_slot = torch.arange(n_b, device=device) - pb + num_prefix + n_unm  # B tokens after prefix and unmerged A
    b_slot[:pb] = 2 * torch.arange(pb, device=device) + 1  # prefix B tokens keep their place
    b_slot = b_slot.expand(b, -1)
    a_slot = torch.empty(b, n_a, dtype=torch.long, device=device)
    a_slot[:, :pa] = 2 * torch.arange(pa, device=device)
    a_slot[rows, unm_idx] = torch.arange(num_prefix, num_prefix + n_unm, device=device)
    a_slot[rows, src_idx] = b_slot.gather(1, dst_idx)
    slot = torch.stack([a_slot[:, :n_b], b_slot], dim=2).flatten(1)
    if n % 2:
        slot = torch.cat([slot, a_slot[:, n_b:]], dim=1)
    index = torch.cat(
        [
            torch.arange(num_prefix, device=device).expand(b, -1),
            2 * unm_idx,
            (2 * torch.arange(pb, n_b, device=device) + 1).expand(b, -1),
        ],
        dim=1,
    )
    return Selection(slot, index, None if size is None else size[..., 0], mean=True)



def redundant_half(metric: Tensor, importance: Tensor, r: int, num_prefix: int = 0) -> Tensor:
    """Zero-TPrune's similarity stage with its "Sequential-U" partition: the ``floor(M / 2)`` least
    important non-prefix tokens form set A, the others set B; each A token is matched to its most
    cosine-similar B token and the ``r`` A tokens with the most similar matches are returned, to be
    dropped (not merged).

    Args:
        metric: ``[B, N, D]`` per-token features (Zero-TPrune: the attention keys).
        importance: ``[B, N - num_prefix]`` importance of the non-prefix tokens (ties: lower position
            counts as less important).
        r: tokens to drop, ``0 <= r <= (N - num_prefix) // 2``.
    Returns ``[B, r]`` positions in the full sequence (ordered by decreasing similarity; ties in A's order).
    """
    m = importance.shape[1]
    if not 0 <= r <= m // 2:
        raise ValueError(f"r must be in [0, {m // 2}] for {m} non-prefix tokens, got {r}")
    order = stable_order(importance, descending=False) + num_prefix
    a, b = order[:, : m // 2], order[:, m // 2 :]
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
    ua, ub = (unit.gather(1, idx[..., None].expand(-1, -1, unit.shape[-1])) for idx in (a, b))
    best = (ua @ ub.transpose(-1, -2)).amax(dim=-1)
    return a.gather(1, stable_order(best)[:, :r])
