"""Merging by matching: ToMe's bipartite soft matching (Bolya et al., ICLR 2023), its two-way form
(MCTF, Lee et al., CVPR 2024), and merging each token into its most similar kept token (DiffRate,
Chen et al., ICCV 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 0, size: Tensor | None = None) -> Selection:
    """Merge the ``r`` tokens of set A most similar to their best partner in set B.

    Args:
        metric: ``[B, N, D]`` per-token features (ToMe: attention keys averaged over heads).
        r: tokens to remove, ``0 <= r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens (CLS, distillation, registers) that are never merged.
        size: ``[B, N, 1]`` original tokens per token; merges are means weighted by it (``None``: plain means).

    The sequence is split alternately (even positions -> A, odd -> B) and compared by cosine
    similarity. Outputs are ordered ``[prefix tokens, unmerged A tokens, B tokens]``; a merged token
    takes the place of its B token (:func:`bipartite_merge`).
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    return bipartite_merge(scores, r, num_prefix, None if size is None else size[..., 0])


def bipartite_merge(
    scores: Tensor, r: int, num_prefix: int = 0, weight: Tensor | None = None, bidirectional: bool = False
) -> Selection:
    """Merge ``r`` of ``N`` tokens along the best edges of a bipartite score matrix.

    Args:
        scores: ``[B, N_A, N_B]`` how alike each token of set A (even positions, ``N_A = ceil(N / 2)``)
            is to each token of set B (odd positions); higher merges first.
        r: tokens to remove, ``0 <= r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens (CLS, distillation, registers) that are never merged: their rows and
            columns are masked out and they stay the first outputs.
        weight: ``[B, N]`` each token's weight in the mean it is merged into (``None``: plain means).
        bidirectional: MCTF's two-way matching: ``r // 2`` A tokens merge into their best B token
            (ToMe's rule), then the ``r - r // 2`` B tokens (merged ones included) whose best score to a
            still-unmerged A token is highest merge into it, on the same scores transposed.

    Every A token scores its best B; the ``r`` (one-way) or ``r // 2`` best A tokens are merged away.
    With prefix tokens the unmerged A tokens are put back in position order, without them they stay in
    score order (as in both references). Outputs: ``[prefix tokens, unmerged A, B]``; the B tokens in
    position order, or in descending order of their best score to the unmerged A (bidirectional). Each
    output is the ``weight``-weighted mean of every token merged into it, chains (A into B into A)
    included.
    """
    b, n_a, n_b = scores.shape
    n, device = n_a + n_b, scores.device
    limit = (n - num_prefix) // 2
    if not 0 <= r <= limit:
        raise ValueError(f"r must be in [0, {limit}] for {n} tokens with {num_prefix} prefix tokens, got {r}")
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    r1 = r // 2 if bidirectional else r
    rows = torch.arange(b, device=device)[:, None]
    with torch.no_grad():
        masked = (torch.arange(n_a, device=device) < pa)[:, None] | (torch.arange(n_b, device=device) < pb)[None, :]
        scores = scores.masked_fill(masked, -math.inf)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]  # A indices that stay / merge away
        dst_idx = node_idx.gather(1, src_idx)  # their B partners
        if num_prefix:
            # Prefix rows score -inf, so they are among the unmerged; sorting puts them first.
            unm_idx = unm_idx.sort(dim=1)[0]
        n_unm = n_a - r1 - pa  # unmerged A tokens after the prefix
        if bidirectional:
            back = scores.gather(1, unm_idx[..., None].expand(-1, -1, n_b)).transpose(1, 2)  # [B, N_B, unmerged A]
            back_max, back_idx = back.max(dim=-1)
            order = back_max.argsort(dim=-1, descending=True)  # prefix B rows (-inf) last
            r2 = r - r1
            src2, stay = order[:, :r2], order[:, r2 : n_b - pb]
            dst2 = back_idx.gather(1, src2)  # positions in unm_idx
        else:
            stay = torch.arange(pb, n_b, device=device).expand(b, -1)

    prefix = torch.arange(num_prefix, device=device)
    b_slot = torch.empty(b, n_b, dtype=torch.long, device=device)
    b_slot[:, :pb] = 2 * prefix[:pb] + 1  # prefix B tokens keep their place
    b_slot[rows, stay] = torch.arange(num_prefix + n_unm, num_prefix + n_unm + stay.shape[1], device=device)
    if bidirectional:
        # output of each entry of unm_idx: prefix A tokens keep their place, the others follow the prefix
        unm_out = torch.cat([2 * prefix[:pa], torch.arange(num_prefix, num_prefix + n_unm, device=device)])
        b_slot[rows, src2] = unm_out[dst2]
    a_slot = torch.empty(b, n_a, dtype=torch.long, device=device)
    a_slot[:, :pa] = 2 * prefix[:pa]
    a_slot[rows, unm_idx[:, pa:]] = torch.arange(num_prefix, num_prefix + n_unm, device=device)
    a_slot[rows, src_idx] = b_slot.gather(1, dst_idx)
    slot = torch.stack([a_slot[:, :n_b], b_slot], dim=2).flatten(1)
    if n % 2:
        slot = torch.cat([slot, a_slot[:, n_b:]], dim=1)
    index = torch.cat([prefix.expand(b, -1), 2 * unm_idx[:, pa:], 2 * stay + 1], dim=1)
    return Selection(slot, index, weight, mean=True)


def merge_into_nearest(
    metric: Tensor, keep_index: Tensor, merge_index: Tensor, num_tokens: int, skip: int = 0
) -> tuple[Tensor, Tensor]:
    """Keep the tokens ``keep_index [B, K]`` as outputs ``0..K-1`` and send each token of ``merge_index
    [B, M]`` to the kept token it is most cosine-similar to on ``metric [B, N, D]``; the first ``skip``
    kept tokens (prefix tokens) never receive one. The rest of the ``num_tokens`` are dropped.

    Returns ``(slot, similarity)``: ``slot [B, N]`` the output of every input (``-1`` dropped) and
    ``similarity [B, M]`` (float32) each merged token's cosine to the kept token it went to."""
    b, k = keep_index.shape
    device = metric.device
    metric = metric.detach().float()
    unit = metric / metric.norm(dim=-1, keepdim=True)
    dst = unit.gather(1, keep_index[:, skip:, None].expand(-1, -1, unit.shape[-1]))
    src = unit.gather(1, merge_index[..., None].expand(-1, -1, unit.shape[-1]))
    similarity, nearest = (src @ dst.transpose(-1, -2)).max(dim=-1)  # [B, M]
    slot = torch.full((b, num_tokens), -1, dtype=torch.long, device=device)
    slot = slot.scatter(1, keep_index, torch.arange(k, device=device).expand(b, -1))
    return slot.scatter(1, merge_index, nearest + skip), similarity
