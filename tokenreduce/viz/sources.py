"""Pure functions from a recorded ``owner`` vector to pictures; they work for every method, since
they never ask which method made them."""

from __future__ import annotations

import torch
from torch import Tensor


def patch_assignment(owner: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """For each patch of a ``grid = (rows, cols)`` image, the final token covering it, or -1 if pruned.

    Args:
        owner: ``[N0]`` for one image (``Record.owner[i]``): the final token covering each original
            token; the first ``num_prefix`` original tokens are not patches.
    Returns:
        ``[rows, cols]`` long tensor.
    """
    rows, cols = grid
    patches = owner[num_prefix:]
    if patches.shape[0] != rows * cols:
        raise ValueError(f"grid {rows}x{cols} has {rows * cols} patches, owner covers {patches.shape[0]}")
    return patches.reshape(rows, cols)


def render_merges(image: Tensor, assignment: Tensor, dim_pruned: float = 0.15, border: bool = True) -> Tensor:
    """Paint every patch with the mean colour of all patches its token covers (ToMe's figure style).

    Args:
        image: ``[3, H, W]`` in [0, 1], with ``H``/``W`` multiples of the grid.
        assignment: ``[rows, cols]`` from :func:`patch_assignment`.
        dim_pruned: brightness factor for patches no final token covers.
        border: draw a dark line where neighbouring patches belong to different tokens.
    """
    rows, cols = assignment.shape
    _, h, w = image.shape
    if h % rows or w % cols:
        raise ValueError(f"image {h}x{w} is not divisible into a {rows}x{cols} patch grid")
    ph, pw = h // rows, w // cols
    patch_mean = image.reshape(3, rows, ph, cols, pw).mean(dim=(2, 4)).reshape(3, -1)  # [3, P]
    flat = assignment.flatten()
    num_tokens = int(flat.max().item()) + 1 if (flat >= 0).any() else 0
    colours = torch.zeros(3, max(num_tokens, 1))
    if num_tokens:
        kept = flat >= 0
        sums = torch.zeros(3, num_tokens).index_add_(1, flat[kept], patch_mean[:, kept])
        counts = torch.zeros(num_tokens).index_add_(0, flat[kept], torch.ones(int(kept.sum())))
        colours = sums / counts.clamp(min=1)
    painted = torch.where(flat >= 0, colours[:, flat.clamp(min=0)], patch_mean * dim_pruned)
    out = painted.reshape(3, rows, 1, cols, 1).expand(3, rows, ph, cols, pw).reshape(3, h, w).clone()
    if border:
        cell = assignment.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
        edge = torch.zeros(h, w, dtype=torch.bool)
        edge[1:, :] |= cell[1:, :] != cell[:-1, :]
        edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
        out[:, edge] *= 0.35
    return out
