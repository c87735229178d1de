"""Attention-derived quantities computed beside fused attention, never instead of it."""

from __future__ import annotations

from torch import Tensor


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
