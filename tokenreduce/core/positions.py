"""Per-token tables that travel with the tokens: rotary position embeddings and the like."""

from __future__ import annotations

from torch import Tensor


def take_per_token(table: Tensor, position: Tensor, num_prefix: int) -> Tensor:
    """The rows of a per-token ``table`` for the current tokens after the prefix.

    ``table`` has one row per original token after the ``num_prefix`` prefix tokens, along its
    second-to-last dimension: ``[N0 - P, D]`` or ``[H, N0 - P, D]`` for every image alike, or
    ``[B, H, N0 - P, D]`` per image (``H`` may be 1). ``position [B, N]`` is, for each current token
    (prefix included, prefix first), the original token whose row it takes (a merged token: the one
    whose position it inherits, :attr:`~tokenreduce.core.Selection.index`). Returns
    ``[B, H, N - P, D]`` (``H`` 1 for a two-dimensional table), which broadcasts against per-head
    queries and keys ``[B, heads, N - P, D]``. A token after the prefix that holds a prefix token's
    position (padding, which no input feeds) takes row 0: it is masked out of attention anyway.
    """
    index = (position[:, num_prefix:] - num_prefix).clamp(min=0)  # [B, M]
    if table.dim() == 2:
        table = table[None, None]
    elif table.dim() == 3:
        table = table[None]
    table = table.expand(position.shape[0], -1, -1, -1)
    index = index[:, None, :, None].expand(-1, table.shape[1], -1, table.shape[-1])
    return table.gather(2, index)
