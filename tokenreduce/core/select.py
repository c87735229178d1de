"""Which tokens to keep by score (EViT, Top-K, random pruning), seeded scores and Gaussian noise for
random choices, and a stable descending order that exports."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def keep_indices(scores: Tensor, k: int, num_prefix: int) -> Tensor:
    """Indices ``[B, num_prefix + k]``: the prefix tokens, then the ``k`` best-scored others.

    Args:
        scores: ``[B, N - num_prefix]`` one score per non-prefix token, higher is kept first.
        k: tokens to keep, ``0 <= k <= N - num_prefix``.
    The kept tokens are ordered by descending score, as in the EViT reference.
    """
    top = scores.topk(k, dim=1, largest=True, sorted=True).indices + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device).expand(scores.shape[0], -1)
    return torch.cat([prefix, top], dim=1)


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """``[B, k]`` positions of the ``k`` highest ``scores [B, N]`` in ascending position order, equal
    scores going to the lower position: the same choice on every device, without a stable sort (which
    ONNX lacks). The k-th largest value is the threshold; of the scores equal to it, the first ones
    fill the count."""
    n = scores.shape[1]
    kth = scores.topk(k, dim=1).values[:, -1:]
    above, tied = scores > kth, scores == kth
    need = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.long().cumsum(dim=1) <= need))
    positions = torch.arange(n, device=scores.device).expand_as(scores)
    # distinct keys: chosen positions first, in order
    return torch.where(chosen, positions, positions + n).topk(k, dim=1, largest=False, sorted=True).values


def split_keep_drop(scores: Tensor, k: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Like :func:`keep_indices`, plus the dropped indices ``[B, N - num_prefix - k]`` in ascending order."""
    keep = keep_indices(scores, k, num_prefix)
    b, n = scores.shape[0], scores.shape[1] + num_prefix
    positions = torch.arange(n, device=scores.device).expand(b, n)
    kept = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter(1, keep, True)
    # Sorting distinct keys (kept positions pushed past n) lists the dropped positions first and in
    # ascending order with a static shape (no nonzero()), and exports to ONNX (no sort on bool/uint8).
    drop = torch.where(kept, positions + n, positions).argsort(dim=1)[:, : n - keep.shape[1]]
    return keep, drop


def hash_scores(n: int, key: int | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Pseudo-random, all-distinct int64 scores ``[n]`` that depend only on ``key`` and the position.

    An integer hash (multiply, xor-shift) instead of a ``torch.Generator``: identical on every
    device and traceable by ``torch.compile``. Positions must be < 2**27. ``key`` may be a 0-d int64
    tensor (a key computed from a timestep without leaving the graph).
    """
    mask = 0xFFFFFFFF
    h = (torch.arange(n, device=device, dtype=torch.int64) * 2654435761 + (key & mask)) & mask
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    return h ^ (h >> 16)


def hash_normal(n: int, key: int | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Standard normal deviates ``[n]`` (float32) that depend only on ``key`` and the position: Box-Muller
    on two uniforms from :func:`hash_scores`, so, like it, free of generator state and traceable by
    ``torch.compile``; the hashed integers are the same on every device (the float transform may differ
    in the last bit). ``n < 2**26``."""
    h = hash_scores(2 * n, key, device).to(torch.float32)
    u1 = (h[:n] + 0.5) / 2**32  # in (0, 1]: the logarithm stays finite
    u2 = h[n:] / 2**32
    return (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)


def stable_order(scores: Tensor, descending: bool = True) -> Tensor:
    """The permutation ``[B, M]`` sorting ``scores [B, M]`` (descending by default), equal scores in
    position order: what ``sort(stable=True)`` returns, from pairwise comparisons (``O(M^2)``) so that
    it exports to ONNX, which has no stable sort."""
    m = scores.shape[1]
    a, b = scores[:, :, None], scores[:, None, :]  # a: the token ranked, b: every other token
    ahead = (b > a) if descending else (b < a)
    position = torch.arange(m, device=scores.device)
    ahead = ahead | ((b == a) & (position[None, None, :] < position[None, :, None]))
    rank = ahead.sum(dim=2)  # [B, M]: how many come before each token
    return torch.empty_like(rank).scatter_(1, rank, position.expand_as(rank))


def pool_partition(scores: Tensor, pool: int, k: int, key: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Importance-based ToMe's destinations: ``k`` tokens drawn at random from the ``pool`` highest-scored
    of each row of ``scores [B, N]``, every other token a source.

    The pool is :func:`top_k_positions`' (equal scores: the lower position first); the draw is
    :func:`hash_scores` of ``key`` over the pool's places, the same places for every row (so a row's
    destinations do not depend on the rest of the batch). ``1 <= k <= pool <= N``.

    Returns ``(sources [B, N - k], destinations [B, k], below [B, N - k])``: positions in ascending order,
    and whether each source scores below the pool's lowest score (strictly: a source tied with it is not
    below)."""
    b, n = scores.shape
    if not 1 <= k <= pool <= n:
        raise ValueError(f"need 1 <= k <= pool <= N, got k={k}, pool={pool}, N={n}")
    device = scores.device
    members = top_k_positions(scores, pool)  # [B, pool], ascending
    lowest = scores.gather(1, members).amin(dim=1, keepdim=True)
    drawn = top_k_positions(hash_scores(pool, key, device).expand(b, -1), k)
    dst = members.gather(1, drawn)  # ascending, as both are
    positions = torch.arange(n, device=device).expand(b, -1)
    is_dst = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, dst, True)
    # distinct keys (destinations pushed past n): the sources first, in ascending order, with a static shape
    src = torch.where(is_dst, positions + n, positions).argsort(dim=1)[:, : n - k]
    return src, dst, scores.gather(1, src) < lowest
