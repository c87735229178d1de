"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) and size-weighted merging."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core.select import gather_tokens


@dataclass(frozen=True)
class BipartiteMatch:
    """Which tokens of set A (even positions) merge into which tokens of set B (odd positions).

    Built by :func:`bipartite_soft_matching`. ``merge`` maps ``[B, N, C] -> [B, N - r, C]`` with the
    output order ``[prefix tokens, unmerged A tokens, B tokens]``; prefix tokens keep their values.
    """

    unm_idx: Tensor  # [B, Na - r - pa]: A positions that stay, prefix rows excluded
    src_idx: Tensor  # [B, r]: A positions merged away
    dst_idx: Tensor  # [B, r]: the B position each of them merges into
    num_prefix: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """Apply the matching to ``x`` ``[B, N, C]``; ``mode`` is a ``scatter_reduce`` reduction."""
        src, dst = x[:, ::2], x[:, 1::2]
        moved = gather_tokens(src, self.src_idx)
        dst = dst.scatter_reduce(1, self.dst_idx[..., None].expand(-1, -1, x.shape[2]), moved, reduce=mode)
        return self._assemble(x, gather_tokens(src, self.unm_idx), dst)

    def _assemble(self, x: Tensor, unm: Tensor, dst: Tensor) -> Tensor:
        # Prefix tokens sit at the front of A and B and nothing merges into or out of them, so
        # their values are x[:, :P] unchanged and they go back in front in their original order.
        p = self.num_prefix
        return torch.cat([x[:, :p], unm, dst[:, p // 2 :]], dim=1)


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 0) -> BipartiteMatch:
    """Match the ``r`` most similar tokens of A to their best partner in B.

    Args:
        metric: ``[B, N, D]`` per-token features (ToMe: attention keys averaged over heads).
        r: tokens to remove, ``0 <= r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens (CLS, distillation, registers) that are never merged.

    The full sequence is split alternately (even positions -> A, odd -> B) and compared by
    cosine similarity. Prefix rows of A and prefix columns of B are masked out.
    """
    n = metric.shape[1]
    limit = (n - num_prefix) // 2
    if not 0 <= r <= limit:
        raise ValueError(f"r must be in [0, {limit}] for {n} tokens with {num_prefix} prefix tokens, got {r}")
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        pa, pb = (num_prefix + 1) // 2, num_prefix // 2
        scores[:, :pa, :] = -math.inf
        scores[:, :, :pb] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        if num_prefix:
            # Prefix rows score -inf so they are the last edges; sorting puts them first to drop them.
            unm_idx = unm_idx.sort(dim=1)[0][:, pa:]
    return BipartiteMatch(unm_idx, src_idx, dst_idx, num_prefix)


def merge_wavg(match: BipartiteMatch, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``x`` ``[B, N, C]`` as a size-weighted average; returns ``(x, size)`` with ``size [B, N - r, 1]``.

    Only B tokens are weighted and renormalised (unmerged A tokens are copied), and the weighted
    sums accumulate in float32 so fp16/bf16 sums of many tokens neither overflow nor lose precision.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    size = size.to(acc)
    src, dst = x[:, ::2], x[:, 1::2]
    src_size, dst_size = size[:, ::2], size[:, 1::2]
    moved_size = gather_tokens(src_size, match.src_idx)
    moved = gather_tokens(src, match.src_idx).to(acc) * moved_size
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(match.dst_idx)
    new_dst_size = dst_size.index_put((rows, match.dst_idx), moved_size, accumulate=True)
    dst = (dst.to(acc) * dst_size).index_put((rows, match.dst_idx), moved, accumulate=True) / new_dst_size
    merged = match._assemble(x, gather_tokens(src, match.unm_idx), dst.to(x.dtype))
    return merged, match._assemble(size, gather_tokens(src_size, match.unm_idx), new_dst_size)
