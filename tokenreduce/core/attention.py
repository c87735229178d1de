"""Attention-derived quantities computed beside fused attention, never instead of it."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection


def size_bias(size: Tensor, dtype) -> Tensor:
    """Proportional-attention bias ``log(size)`` as an additive float mask ``[B, 1, 1, N]``."""
    return size.log()[:, None, None, :, 0].to(dtype)


def cls_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, index: int = 0) -> Tensor:
    """Softmax attention of token ``index`` to every token, averaged over heads: ``[B, N]``.

    Computes only that query row (``q_cls @ K^T``, ``O(N)`` per head) so the layer itself keeps
    using SDPA. ``q``/``k`` are ``[B, H, N, D]`` after any qk-norm; ``bias`` is the layer's additive mask.
    """
    logits = (q[:, :, index : index + 1].float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def attention_probs(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Softmax attention of every query to every key ``[B, H, N, N]`` in float32, from ``q``/``k``
    ``[B, H, N, D]`` and the layer's additive ``bias``: computed beside fused attention, which never
    returns it."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


def merge_attention(probs: Tensor, selection: Selection) -> Tensor:
    """The attention map of the merged tokens, from the map ``probs [B, H, N, N]`` of the tokens before a
    sparse merging ``selection`` (MCTF's one-step-ahead attention): each merged key receives the sum of
    the probabilities of its inputs, each merged query row is its inputs' rows combined with the
    selection's coefficients (a weighted mean for merges), so rows still sum to 1. ``[B, H, M, M]``."""
    b, h, n, _ = probs.shape
    m = selection.num_out
    by_key = probs.permute(0, 3, 1, 2).reshape(b, n, h * n)  # keys first
    by_key = Selection(selection.slot, selection.index).apply(by_key)  # coefficients 1: sums over merged keys
    by_query = by_key.view(b, m, h, n).permute(0, 3, 2, 1).reshape(b, n, h * m)  # queries first
    return selection.apply(by_query).view(b, m, h, m).transpose(1, 2)


def received_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Softmax attention each of the ``N`` keys receives, averaged over heads and over all queries:
    ``[B, N]`` for ``q [B, H, Q, D]`` and ``k [B, H, N, D]`` (``Q = N`` for self-attention).

    The saliency used in place of CLS attention by towers without a class token (SigLIP): the full
    ``N x N`` map of one layer, computed head by head in float32 beside the layer's own attention.
    """
    total = q.new_zeros(k.shape[0], k.shape[2], dtype=torch.float32)
    for h in range(q.shape[1]):
        logits = (q[:, h].float() * scale) @ k[:, h].float().transpose(-2, -1)
        if bias is not None:
            logits = logits + bias[:, min(h, bias.shape[1] - 1)].float()
        total += logits.softmax(dim=-1).mean(dim=1)
    return total / q.shape[1]


def head_received_attention(
    q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, queries: Tensor | None = None
) -> Tensor:
    """Per head, the softmax attention each of the ``N`` keys receives, summed over the queries marked in
    ``queries [B, Q]`` (all of them when ``None``): ``[B, H, N]`` float32, for ``q [B, H, Q, D]``, ``k [B,
    H, N, D]`` and the layer's additive ``bias [B, 1 or H, Q, N]``. Head by head, beside the layer's own
    attention: the cross-attention saliency of image features (Trimmed Llama)."""
    weight = None if queries is None else queries.float()[:, :, None]
    heads = []
    for h in range(q.shape[1]):
        logits = (q[:, h].float() * scale) @ k[:, h].float().transpose(-2, -1)
        if bias is not None:
            logits = logits + bias[:, min(h, bias.shape[1] - 1)].float()
        probs = logits.softmax(dim=-1)
        heads.append((probs if weight is None else probs * weight).sum(dim=1))
    return torch.stack(heads, dim=1)


def row_attention(query: Tensor, k: Tensor, rows: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    """Causal softmax attention of one query per sample to every token, averaged over heads: ``[B, L]``.
    ``query [B, H, D]`` is the query of position ``rows [B]``; ``k [B, H_kv, L, D]`` the keys (grouped-query
    heads shared); ``key_mask [B, L]`` True on real (unpadded) tokens. ``O(L)`` per head: the layer
    itself keeps SDPA."""
    length = k.shape[2]
    keys = k.float().repeat_interleave(query.shape[1] // k.shape[1], dim=1)  # [B, H, L, D]
    logits = torch.einsum("bhd,bhld->bhl", query.float(), keys) * scale
    visible = key_mask.bool() & (torch.arange(length, device=k.device) <= rows[:, None])
    return logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)


def rows_attention(q: Tensor, k: Tensor, rows: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    """One sample's causal softmax attention from the query positions ``rows [R]`` to every token,
    averaged over heads and over those rows: ``[L]``. ``q [H, L, D]``, ``k [H_kv, L, D]``, ``key_mask
    [L]`` True on real tokens. Only those rows are computed (the layer itself keeps SDPA)."""
    length = k.shape[1]
    keys = k.float().repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # [H, L, D]
    logits = (q[:, rows].float() @ keys.transpose(-1, -2)) * scale  # [H, R, L]
    visible = key_mask.bool()[None] & (torch.arange(length, device=k.device)[None] <= rows[:, None])  # [R, L]
    return logits.masked_fill(~visible[None], float("-inf")).softmax(dim=-1).mean(dim=(0, 1))


def zero_smallest(probs: Tensor, count: int) -> Tensor:
    """``probs [B, H, N, N]`` with every entry below the ``count``-th smallest of its ``(batch, head)``
    map set to 0, without renormalising (GTP-ViT's attention sparsity, ``count = int(N^2 (1 - theta))``;
    entries equal to that value stay). ``count = 0`` changes nothing."""
    flat = probs.flatten(2)
    total = flat.shape[-1]
    if not 0 <= count <= total:
        raise ValueError(f"count must be in [0, {total}] for {total} entries per map, got {count}")
    if count == 0:
        return probs
    # The count-th smallest is the (total - count + 1)-th largest: take the shorter top-k.
    if count <= total - count + 1:
        threshold = flat.topk(count, dim=-1, largest=False).values.amax(dim=-1)
    else:
        threshold = flat.topk(total - count + 1, dim=-1).values.amin(dim=-1)
    return torch.where(probs < threshold[..., None, None], torch.zeros_like(probs), probs)


def weighted_pagerank(probs: Tensor, iterations: int, alive: Tensor | None = None, first_weight: float = 1.0) -> Tensor:
    """Zero-TPrune's Weighted PageRank per head: ``s <- A^T s`` (a token's score is the attention it
    receives, weighted by the score of each token giving it) ``iterations`` times.

    Args:
        probs: ``[B, H, N, N]`` softmax attention, rows are queries.
        alive: ``[B, N]`` bool, the tokens of the graph (``None``: all). Others neither give nor receive:
            each row is renormalised over the alive keys (the softmax without the others) and their
            scores stay 0.
        first_weight: the initial score of token 0 relative to the others (Zero-TPrune: ``sqrt(N)`` for
            the class token, ``N`` the alive count; 1 for the uniform variant).
    Returns ``[B, H, N]`` float32 scores, each head's summing to 1 over the alive tokens.
    """
    a = probs.float()
    start = torch.ones(a.shape[0], a.shape[-1], device=a.device)
    if alive is not None:
        keys = alive[:, None, None, :].float()
        a = a * keys
        a = a / a.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) * alive[:, None, :, None].float()
        start = alive.float()
    start = torch.cat([start[:, :1] * first_weight, start[:, 1:]], dim=1)
    s = (start / start.sum(dim=1, keepdim=True))[:, None, None, :].expand(-1, a.shape[1], -1, -1)  # [B, H, 1, N]
    for _ in range(iterations):
        s = s @ a
    return s[:, :, 0]


def head_rms(scores: Tensor, alive: Tensor | None = None, variance: tuple[float, float] | None = None) -> Tensor:
    """Zero-TPrune's head aggregation ``sqrt(mean over heads of s^2)`` of ``scores [B, H, N]`` (EIR),
    over the heads whose score variance lies in ``variance = (low, high)`` (its head filter; all heads
    when ``None`` or when none does). The variance is taken over the ``alive [B, N]`` tokens (default
    all) of the scores scaled to mean 1 there. Returns ``[B, N]``."""
    s = scores.float()
    weight = torch.ones(s.shape[:2], device=s.device)
    if variance is not None:
        mask = torch.ones_like(s[:, 0]) if alive is None else alive.float()
        count = mask.sum(dim=1)[:, None]
        mean = (s * mask[:, None]).sum(dim=-1) / count
        x = s / mean[..., None]
        var = (((x - 1) ** 2) * mask[:, None]).sum(dim=-1) / count
        inside = ((var >= variance[0]) & (var <= variance[1])).float()
        weight = torch.where(inside.sum(dim=1, keepdim=True) > 0, inside, weight)
    return ((s**2 * weight[..., None]).sum(dim=1) / weight.sum(dim=1)[:, None]).sqrt()
