"""Splitting a token budget among the parts of an image (AnyRes crops)."""

from __future__ import annotations

import torch
from torch import Tensor


def apportion(weights: Tensor, total: int, caps: Tensor) -> Tensor:
    """Split ``total`` tokens among ``C`` parts in proportion to ``weights [B, C]`` (>= 0), none above
    its ``caps [C]`` (or ``[B, C]``): ``[B, C]`` long whose rows sum to ``total`` (``<= caps.sum()``).

    Water-filling: a part whose share exceeds its cap gets the cap, and what is left is shared again
    among the others; then each share is floored and the tokens still left go one each to the largest
    fractional remainders (the lower index first on ties), never above a cap. Parts of zero weight
    share in proportion to their caps when every part still open has zero weight.
    """
    caps = caps.expand_as(weights).long()
    if bool((caps.sum(dim=1) < total).any()):
        raise ValueError(f"cannot apportion {total} tokens among parts holding {caps.sum(dim=1).tolist()}")
    out = torch.zeros_like(caps)
    for row, (w, cap) in enumerate(zip(weights.double(), caps)):
        fixed = cap <= 0
        share = torch.zeros_like(w)
        while True:
            open_ = ~fixed
            rest = total - float(cap[fixed].sum())
            weight = torch.where(open_, w, 0.0)
            if float(weight.sum()) <= 0:
                weight = torch.where(open_, cap.double(), 0.0)
            share = torch.where(open_, rest * weight / weight.sum(), cap.double())
            over = open_ & (share > cap)
            if not bool(over.any()):
                break
            fixed |= over
        base = share.floor().long().clamp(max=cap)
        left = total - int(base.sum())
        remainder = torch.where(base < cap, share - base, -1.0)
        order = sorted(range(len(w)), key=lambda i: (-float(remainder[i]), i))[:left]
        base[order] += 1
        out[row] = base
    return out
