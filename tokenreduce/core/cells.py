"""Destinations on a token grid split into cells: one token per ``sy x sx`` cell is a destination, the
others are sources (tomesd's 2D-strided partition, also used by SiTo and importance-based ToMe)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.indices import made_once
from tokenreduce.core.select import hash_scores


def random_cell_choice(cells: tuple[int, int], cell_size: int, key: int | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A pseudo-random position in ``[0, cell_size)`` for each of the ``cells = (rows, cols)`` cells
    ``[rows, cols]``, a function of ``key`` alone (:func:`hash_scores`: no generator state, so cond and
    uncond branches, split or batched, and compiled graphs all draw the same)."""
    rows, cols = cells
    return (hash_scores(rows * cols, key, device) % cell_size).view(rows, cols)


def cell_argmax(scores: Tensor, grid: tuple[int, int], sx: int, sy: int) -> Tensor:
    """The position of the highest score in each whole ``sy x sx`` cell of a row-major ``grid = (h, w)``:
    ``scores [..., h * w] -> [..., h // sy, w // sx]`` (row-major within the cell, as :func:`cell_partition`
    takes it; ties go to the first). The rows and columns of a ragged border belong to no cell."""
    h, w = grid
    rows, cols = h // sy, w // sx
    lead = scores.shape[:-1]
    cells = scores.reshape(*lead, h, w)[..., : rows * sy, : cols * sx].reshape(*lead, rows, sy, cols, sx)
    return cells.transpose(-3, -2).reshape(*lead, rows, cols, sy * sx).argmax(dim=-1)


def cell_partition(grid: tuple[int, int], sx: int, sy: int, choice: Tensor) -> tuple[Tensor, Tensor]:
    """Split the tokens of a row-major ``grid = (h, w)`` into ``(sources [..., Na], destinations [..., Nb])``.

    Each whole ``sy x sx`` cell contributes one destination, the token at ``choice[..., i, j]`` (row-major
    within the cell, ``choice [..., h // sy, w // sx]``, leading dimensions for one choice per image);
    every other token, the rows and columns of a ragged border included, is a source. Both come back in
    row-major order of the grid, with static shapes (``Nb = (h // sy) * (w // sx)``), so compile traces it."""
    h, w = grid
    rows, cols = h // sy, w // sx
    if choice.shape[-2:] != (rows, cols):
        raise ValueError(
            f"choice must have one entry per {sy}x{sx} cell of the {h}x{w} grid: shape (..., {rows}, {cols}), "
            f"got {tuple(choice.shape)}"
        )
    device = choice.device
    n = h * w
    cell_row = torch.arange(rows, device=device)[:, None] * sy + choice // sx
    cell_col = torch.arange(cols, device=device)[None, :] * sx + choice % sx
    dst = (cell_row * w + cell_col).flatten(-2)
    is_dst = torch.zeros(*choice.shape[:-2], n, dtype=torch.bool, device=device).scatter_(-1, dst, True)
    position = torch.arange(n, device=device)
    # distinct keys, destinations pushed past n: sources first, each part in position order
    order = torch.where(is_dst, position + n, position).argsort(dim=-1)
    return order[..., : n - dst.shape[-1]], order[..., n - dst.shape[-1] :]


def corner_partition(grid: tuple[int, int], sx: int, sy: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """:func:`cell_partition` with each cell's destination at its top-left (tomesd without randomness),
    made once per arguments and shared (:func:`~tokenreduce.core.indices.made_once`: read-only)."""
    device = torch.device(device)
    rows, cols = grid[0] // sy, grid[1] // sx

    def make() -> tuple[Tensor, Tensor]:
        return cell_partition(grid, sx, sy, torch.zeros(rows, cols, dtype=torch.long, device=device))

    return made_once(("corner_partition", tuple(grid), sx, sy, device), device, make)
