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
    """Softmax attention each token receives, averaged over heads and over all queries: ``[B, N]``.

    The saliency used in place of CLS attention by towers without a class token (SigLIP): the full
    ``N x N`` map of one layer, computed head by head in float32 beside the layer's own attention.
    """
    total = q.new_zeros(q.shape[0], q.shape[2], dtype=torch.float32)
    for h in range(q.shape[1]):
        logits = (q[:, h].float() * scale) @ k[:, h].float().transpose(-2, -1)
        if bias is not None:
            logits = logits + bias[:, min(h, bias.shape[1] - 1)].float()
        total += logits.softmax(dim=-1).mean(dim=1)
    return total / q.shape[1]


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
