"""Merging by matching: the general bipartite step (given two sets of tokens and their similarities, merge
or drop the ``r`` sources with the strongest edges), ToMe's soft matching (Bolya et al., ICLR 2023) and its
two-way form (MCTF, Lee et al., CVPR 2024), threshold merging (DyMU), merging into the most similar kept
token (DiffRate, Chen et al., ICCV 2023) and Zero-TPrune's similarity stage."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenreduce.core.indices import span
from tokenreduce.core.select import stable_order
from tokenreduce.core.selection import Selection, weighted_mean_coeff

# row_max's two passes: blocks of 32 entries (the width torch's CPU amax reduces fastest), for rows of
# at least 256 entries (shorter ones are as fast in one pass).
_BLOCK, _BLOCKED_ROW = 32, 256


def row_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=-1)`` for ``scores [..., M]``: each row's largest value and the index of its first
    occurrence (NaN counting as the largest, as torch's), the same values and indices.

    On CPU torch finds the index one entry at a time; for long rows this takes the maxima of blocks of
    32 entries first (vectorised), then the index inside the first block holding the row's maximum: a
    quarter to half of the time at ``M`` of 1024."""
    m = scores.shape[-1]
    if scores.device.type != "cpu" or m < _BLOCKED_ROW:
        return scores.max(dim=-1)
    g, k = _BLOCK, m // _BLOCK
    block_max = scores[..., : k * g].unflatten(-1, (k, g)).amax(dim=-1)
    if k * g < m:
        block_max = torch.cat([block_max, scores[..., k * g :].amax(dim=-1, keepdim=True)], dim=-1)
    values, block = block_max.max(dim=-1, keepdim=True)
    # the last block may be short: its columns past the end repeat the last one, after it in order
    cols = (block * g + span(g, device=scores.device)).clamp(max=m - 1)
    inner = scores.gather(-1, cols).argmax(dim=-1, keepdim=True)
    return values[..., 0], cols.gather(-1, inner)[..., 0]


# Scores best_match holds at once: 4 MiB of float32, which on CPU stays in cache, and bounds the memory
# of the similarity at any latent size.
_CHUNK_SCORES = 2**20


def best_match(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The best B row for each A row: ``row_max(a @ b.transpose(-1, -2))`` for ``a [B, Na, C]`` and
    ``b [B, Nb, C]`` (``Nb >= 1``), both ``[B, Na]``, computed on near-equal chunks of A rows so that
    about ``2**20`` scores exist at once."""
    batch, n_a, _ = a.shape
    parts = max(1, min(n_a, -(-batch * n_a * b.shape[1] // _CHUNK_SCORES)))
    bt = b.transpose(-1, -2)
    if parts == 1:
        return row_max(a @ bt)
    values, indices = zip(*(row_max(chunk @ bt) for chunk in a.tensor_split(parts, dim=1)))
    return torch.cat(values, dim=1), torch.cat(indices, dim=1)


def best_partners(metric: Tensor, num_prefix: int = 0, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ToMe's edges: every token of set A (even positions) to its most cosine-similar token of set B (odd
    positions). ``metric [B, N, D]``; ``valid [B, N]`` False on padding (``None``: no padding).

    Returns ``(similarity, partner)``, both ``[B, ceil(N / 2)]``: the best similarity (``-inf`` for prefix
    and padding rows of A, and rows with no valid partner) and the B index it points to. Prefix
    columns of B and padding columns are never partners."""
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, :pa, :] = -math.inf
    scores[:, :, :pb] = -math.inf
    if valid is not None:
        pair = valid[:, ::2, None] & valid[:, None, 1::2]
        scores = scores.masked_fill(~pair, -math.inf)
    return scores.max(dim=-1)


def bipartite_merge(
    scores: Tensor | None,
    a_index: Tensor,
    b_index: Tensor,
    r: int,
    num_tokens: int,
    keep_index: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    sort_unmerged: bool = False,
    drop_sources: bool = False,
    copy_back: bool = False,
    bidirectional: bool = False,
    best: tuple[Tensor, Tensor] | None = None,
) -> Selection:
    """Merge ``r`` tokens along the strongest edges between set A and set B.

    Args:
        scores: ``[B, Na, Nb]`` similarity of every A token to every B token (``-inf`` forbids an edge);
            ``None`` when ``best`` is given (and not ``bidirectional``).
        a_index: ``[B, Na]`` positions of the A tokens among the ``num_tokens`` inputs.
        b_index: ``[B, Nb]`` positions of the B tokens.
        r: tokens merged away, ``0 <= r <= Na`` (``r = Na``: every A token merges into its best B).
        num_tokens: ``N``, the input token count.
        keep_index: ``[B, K]`` positions kept unchanged in front (prefix tokens, protected tokens);
            inputs in none of keep/A/B are dropped.
        weight: ``[B, N]`` each token's weight in the mean it is merged into (sizes; ``None``: plain means).
        sort_unmerged: list the unmerged A tokens in ``a_index`` order (else by descending best edge).
        drop_sources: prune instead of merging: the ``r`` sources are dropped, their partners unchanged.
        copy_back: with ``drop_sources``, each dropped source keeps its partner's output as its ``slot``
            (copy-back pruning, see :class:`Selection`): :meth:`Selection.unmerge` gives it the
            partner's output, while applying still gathers the kept tokens only (SiTo's recovery).
        bidirectional: MCTF's two-way matching: ``r // 2`` A tokens merge into their best B token, then
            the ``r - r // 2`` B tokens (merged ones included) whose best score to a still-unmerged A
            token is highest merge into it, on the same scores transposed; the B tokens that stay are
            then listed by descending best score to the unmerged A.
        best: ``([B, Na], [B, Na])`` each A token's best score and the place in B of its first
            occurrence, as :func:`row_max` of ``scores`` (or :func:`best_match`) gives them.

    Outputs are ``[keep tokens, unmerged A tokens, B tokens (in b_index order)]``; a merged token takes
    the place of its partner. Each output is the ``weight``-weighted mean of every token merged into it,
    chains (A into B into A) included. The edge ranking sorts by score, descending (ties in no fixed order).
    """
    b, n_a = a_index.shape
    n_b = b_index.shape[1]
    if not 0 <= r <= n_a:
        raise ValueError(f"r must be in [0, {n_a}] for {n_a} tokens in set A, got {r}")
    if copy_back and (not drop_sources or bidirectional):
        raise ValueError("copy_back keeps the partners of dropped sources: it needs drop_sources=True and bidirectional=False")
    if (scores is None) == (best is None) or (bidirectional and scores is None):
        raise ValueError("bipartite_merge takes scores or best (bidirectional matching: scores)")
    device = a_index.device
    if keep_index is None:
        keep_index = torch.zeros(b, 0, dtype=torch.long, device=device)
    r1 = r // 2 if bidirectional else r
    with torch.no_grad():
        if best is not None:
            node_max, node_idx = best
        elif n_b:
            node_max, node_idx = row_max(scores)
        else:  # nothing to merge into (r is 0)
            node_max, node_idx = scores.new_zeros(b, n_a), torch.zeros(b, n_a, dtype=torch.long, device=device)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]
        if sort_unmerged:
            unm_idx = unm_idx.sort(dim=1)[0]
        dst_idx = node_idx.gather(1, src_idx)
        if bidirectional:
            back = scores.gather(1, unm_idx[..., None].expand(-1, -1, n_b)).transpose(1, 2)  # [B, Nb, unmerged A]
            back_max, back_idx = back.max(dim=-1)
            order = back_max.argsort(dim=-1, descending=True)
            b_src, b_stay = order[:, : r - r1], order[:, r - r1 :]
            b_dst = back_idx.gather(1, b_src)  # places in unm_idx
        else:
            b_stay = span(n_b, device=device).expand(b, -1)
    k, n_unm, n_stay = keep_index.shape[1], n_a - r1, b_stay.shape[1]
    unmerged = a_index.gather(1, unm_idx)
    stay_slot = span(k + n_unm, k + n_unm + n_stay, device=device).expand(b, -1)
    if bidirectional:
        b_slot = torch.empty(b, n_b, dtype=torch.long, device=device).scatter_(1, b_stay, stay_slot)
        b_slot = b_slot.scatter_(1, b_src, k + b_dst)
        b_kept = b_index.gather(1, b_stay)
    else:  # every B token stays, in order
        b_slot, b_kept = stay_slot, b_index
    # in place on a fresh tensor: each scatter would otherwise copy the whole row first
    slot = torch.full((b, num_tokens), -1, dtype=torch.long, device=device)
    slot.scatter_(1, keep_index, span(k, device=device).expand(b, -1))
    slot.scatter_(1, unmerged, span(k, k + n_unm, device=device).expand(b, -1))
    slot.scatter_(1, b_index, b_slot)
    sources = a_index.gather(1, src_idx)
    dropped = drop_sources and not copy_back
    slot.scatter_(1, sources, torch.full_like(sources, -1) if dropped else b_slot.gather(1, dst_idx))
    index = torch.cat([keep_index, unmerged, b_kept], dim=1)
    if drop_sources:
        return Selection(slot, index, gather_only=True)
    return Selection(slot, index, weight, mean=True)


def alternate_merge(
    scores: Tensor,
    r: int,
    num_prefix: int = 0,
    weight: Tensor | None = None,
    *,
    drop_sources: bool = False,
    bidirectional: bool = False,
) -> Selection:
    """:func:`bipartite_merge` on ToMe's sets: the ``N`` tokens split by position parity (even -> A, odd
    -> B), ``scores [B, ceil(N / 2), N // 2]`` between them; the ``num_prefix`` leading tokens (CLS,
    distillation, registers) are never merged and stay in front, ``r <= (N - num_prefix) // 2``. With
    prefix tokens the unmerged A tokens stay in position order, as in the references."""
    b, n = scores.shape[0], scores.shape[1] + scores.shape[2]
    limit = (n - num_prefix) // 2
    if not 0 <= r <= limit:
        raise ValueError(f"r must be in [0, {limit}] for {n} tokens with {num_prefix} prefix tokens, got {r}")
    first_a = min(num_prefix + num_prefix % 2, n)  # the first even position after the prefix
    first_b = min(num_prefix + 1 - num_prefix % 2, n)
    device = scores.device
    a_index = span(first_a, n, 2, device=device).expand(b, -1)
    b_index = span(first_b, n, 2, device=device).expand(b, -1)
    keep_index = span(num_prefix, device=device).expand(b, -1)
    return bipartite_merge(
        scores[:, first_a // 2 :, first_b // 2 :],
        a_index,
        b_index,
        r,
        n,
        keep_index,
        weight,
        sort_unmerged=num_prefix > 0,
        drop_sources=drop_sources,
        bidirectional=bidirectional,
    )


def bipartite_soft_matching(
    metric: Tensor, r: int, num_prefix: int = 0, size: Tensor | None = None, *, drop_sources: bool = False
) -> Selection:
    """ToMe: merge the ``r`` tokens of set A most cosine-similar to their best partner in set B.

    Args:
        metric: ``[B, N, D]`` per-token features (ToMe: attention keys averaged over heads).
        r: tokens to remove, ``0 <= r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens (CLS, distillation, registers) that are never merged.
        size: ``[B, N, 1]`` original tokens per token; merges are means weighted by it (``None``: plain means).
        drop_sources: prune the ``r`` sources instead (their partners unchanged), as :func:`bipartite_merge`.

    The sets and the output order are :func:`alternate_merge`'s: ``[prefix tokens, unmerged A tokens,
    B tokens]``, a merged token in the place of its B token.
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    return alternate_merge(scores, r, num_prefix, None if size is None else size[..., 0], drop_sources=drop_sources)


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


def merge_edges(merged: Tensor, partner: Tensor, num_tokens: int, num_prefix: int = 0, size: Tensor | None = None) -> Selection:
    """Merge A token ``i`` (position ``2i`` of ``num_tokens``) into its partner B token (position
    ``2 partner[:, i] + 1``) wherever ``merged [B, ceil(N / 2)]`` is True, size-weighted: a different
    number of merges per row.

    ``size [B, N, 1]`` weights the means (``None``: all ones); tokens of size 0 are padding and feed
    nothing. Each row's outputs are ``[prefix tokens, unmerged A tokens, B tokens]`` (each in position
    order; a merged token takes its B token's place and position), then padding up to the longest row:
    outputs no input feeds (size 0, value 0, the position of token 0). The output count is read from
    the data (one host sync), so this runs eagerly only."""
    b, n = merged.shape[0], num_tokens
    device = merged.device
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    valid = torch.ones(b, n, dtype=torch.bool, device=device) if size is None else size[..., 0] > 0
    kept_a = valid[:, ::2] & ~merged
    kept_a[:, :pa] = False
    real_b = valid[:, 1::2].clone()
    real_b[:, :pb] = False
    n_kept = kept_a.sum(dim=1, keepdim=True)
    b_slot = torch.where(real_b, num_prefix + n_kept + real_b.long().cumsum(dim=1) - 1, -1)
    b_slot[:, :pb] = 2 * torch.arange(pb, device=device) + 1  # prefix B tokens keep their place
    a_slot = torch.where(kept_a, num_prefix + kept_a.long().cumsum(dim=1) - 1, -1)
    a_slot = torch.where(merged, b_slot.gather(1, partner), a_slot)
    a_slot[:, :pa] = 2 * torch.arange(pa, device=device)
    slot = torch.empty(b, n, dtype=torch.long, device=device)
    slot[:, ::2], slot[:, 1::2] = a_slot, b_slot
    # A row that merges nothing keeps its order (as when it runs alone and nothing happens to it);
    # its real tokens lead and padding follows, as they came in.
    still = ~merged.any(dim=1, keepdim=True)
    slot = torch.where(still, torch.where(valid, torch.arange(n, device=device), -1), slot)
    num_out = int((num_prefix + n_kept[:, 0] + real_b.sum(dim=1)).max())
    inherits = slot >= 0  # outputs take the position of their prefix, unmerged A or B token
    inherits[:, ::2] &= ~merged
    index = torch.zeros(b, num_out + 1, dtype=torch.long, device=device)
    index = index.scatter(1, torch.where(inherits, slot, num_out), torch.arange(n, device=device).expand(b, -1))
    weight = valid.float() if size is None else size[..., 0]
    return Selection(slot, index[:, :num_out], weighted_mean_coeff(slot, weight, num_out))


def _ranks(scores: Tensor) -> Tensor:
    """Each entry's place in its row sorted descending (0 for the largest; ties by position)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))


def threshold_soft_matching(
    metric: Tensor, threshold: float, num_prefix: int = 0, size: Tensor | None = None, max_r: int | None = None
) -> Selection | None:
    """Merge, per row, every A token whose best B partner's cosine similarity exceeds ``threshold``
    (DyMU's dynamic ToMe), at most half of the row's non-prefix tokens and at most ``max_r``, the most
    similar first. ``metric [B, N, D]``; ``size [B, N, 1]`` as in :func:`merge_edges` (size 0 is
    padding). Outputs as :func:`merge_edges` gives them; ``None`` when no row merges anything."""
    b, n = metric.shape[:2]
    valid = None if size is None else size[..., 0] > 0
    with torch.no_grad():
        similarity, partner = best_partners(metric, num_prefix, valid)
        real = n if valid is None else valid.sum(dim=1, keepdim=True)
        cap = (real - num_prefix) // 2
        if max_r is not None:
            cap = torch.clamp(torch.as_tensor(cap, device=metric.device), max=max_r)
        merged = (similarity > threshold) & (_ranks(similarity) < cap)
    if not bool(merged.any()):
        return None
    return merge_edges(merged, partner, n, num_prefix, size)


def batch_soft_matching(
    metric: Tensor, r: int, num_prefix: int = 0, size: Tensor | None = None
) -> tuple[Selection | None, Tensor | None]:
    """DyMU's batch-level matching, for calibrating thresholds: rank the A -> B edges of all rows together
    and merge the ``r * B`` most similar (``r`` at most half of the ``N - num_prefix`` mergeable tokens),
    so rows merge different counts. ``metric``, ``size`` as in :func:`threshold_soft_matching`.

    Returns the selection (``None`` when ``r`` is 0) and the threshold it stands for: the similarity of
    the most similar edge left unmerged (the ``r * B``-th, counting from 0), clamped at 0 (0-d tensor)."""
    b, n = metric.shape[:2]
    r = min(r, (n - num_prefix) // 2)
    if r <= 0:
        return None, None
    valid = None if size is None else size[..., 0] > 0
    with torch.no_grad():
        similarity, partner = best_partners(metric, num_prefix, valid)
        flat = similarity.flatten()
        ranked = flat.sort(descending=True, stable=True).values
        threshold = ranked[min(r * b, flat.shape[0] - 1)].clamp(min=0)
        merged = ((_ranks(flat) < r * b) & (flat > -math.inf)).view(b, -1)
    return merge_edges(merged, partner, n, num_prefix, size), threshold
