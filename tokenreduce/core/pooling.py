"""Average pooling of tokens: laid out on a patch grid (as a selection), and weighted by token size."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection, first_inputs, weighted_mean_coeff


def grid_pool(batch: int, grid: tuple[int, int], stride: int, device: torch.device | str = "cpu") -> Selection:
    """Mean of every ``stride x stride`` window of a row-major ``grid = (rows, cols)`` of tokens.

    Windows at the right and bottom edges are cut short (``ceil`` division), so every token feeds one
    output; outputs are in row-major window order and inherit the position of the window's top-left token.
    """
    rows, cols = grid
    out_cols = -(-cols // stride)
    r = torch.arange(rows, device=device)[:, None] // stride
    c = torch.arange(cols, device=device)[None, :] // stride
    slot = (r * out_cols + c).flatten()[None]
    num_out = -(-rows // stride) * out_cols
    slot, index = slot.expand(batch, -1), first_inputs(slot, num_out).expand(batch, -1)
    return Selection(slot, index, weighted_mean_coeff(slot, torch.ones(slot.shape, device=device), num_out))


def size_weighted_mean(tokens: Tensor, size: Tensor) -> Tensor:
    """``[B, C]``: the mean of ``tokens [B, N, C]`` over the original tokens they cover, ``size [B, N, 1]``
    (a merged token counts as many as it holds): the plain mean of the unreduced tokens."""
    weight = size.to(tokens.dtype)
    return (tokens * weight).sum(dim=1) / weight.sum(dim=1)


def adaptive_pool_matrix(grid: tuple[int, int], out_grid: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """``[h * w, rows * cols]`` float32: ``adaptive_avg_pool2d`` from a row-major ``grid = (rows, cols)``
    to ``out_grid = (h, w)`` as a matrix. Cell ``i`` of an axis of length ``n`` pooled to ``m`` averages
    ``floor(i * n / m) <= j < ceil((i + 1) * n / m)``, so cells overlap when ``m`` does not divide ``n``."""

    def axis(n: int, m: int) -> Tensor:
        i = torch.arange(m, device=device)[:, None]
        start, end = (i * n) // m, ((i + 1) * n + m - 1) // m
        j = torch.arange(n, device=device)[None, :]
        return ((j >= start) & (j < end)).float() / (end - start).float()

    return torch.kron(axis(grid[0], out_grid[0]), axis(grid[1], out_grid[1]))
