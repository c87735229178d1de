"""Giving back a full patch grid from reduced tokens, for dense heads (segmentation, saliency, depth)."""

from __future__ import annotations

import torch
from torch import Tensor


def fill_unowned(owner: Tensor, grid: tuple[int, int]) -> Tensor:
    """``owner [B, N]`` (the output covering each of ``N = rows * cols`` patches, ``-1`` where a patch was
    dropped) with every dropped patch given the output of the nearest covered patch on the grid
    (Euclidean distance, ties to the lower index)."""
    rows, cols = grid
    if owner.shape[1] != rows * cols:
        raise ValueError(f"owner has {owner.shape[1]} patches for a {rows}x{cols} grid")
    if bool((owner >= 0).all()):
        return owner
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([y.flatten(), x.flatten()], dim=1).float().to(owner.device)
    dist = torch.cdist(coords, coords)  # [N, N]
    dist = dist[None].expand(owner.shape[0], -1, -1).masked_fill((owner < 0)[:, None, :], float("inf"))
    donor = dist.argmin(dim=-1)  # [B, N]: nearest covered patch (itself when covered)
    return owner.gather(1, donor)


def restore_grid(tokens: Tensor, owner: Tensor, grid: tuple[int, int]) -> Tensor:
    """``tokens [B, M, D]`` (a reduced model's output tokens) spread back over the patch grid:
    ``[B, N, D]`` where each patch takes the token covering it (merging: its merged token, ToMe-style
    unmerge) or, when it was dropped, the token of the nearest covered patch."""
    filled = fill_unowned(owner, grid)
    if bool((filled < 0).any()):
        raise ValueError("no patch of some image is covered by an output token")
    return tokens.gather(1, filled[..., None].expand(-1, -1, tokens.shape[-1]))
