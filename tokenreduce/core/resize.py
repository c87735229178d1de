"""Resizing a token grid as ``F.interpolate`` or ``F.avg_pool2d`` resizes an image, as a selection (ToDo's
downsampled keys and values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.selection import Selection

# The modes whose every input token feeds at most one output when each axis shrinks (at least 2x for
# bilinear), so that the resize is a sparse selection: a gather for the nearest modes.
RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "avg_pool")


def resize_weights(size: int, out_size: int, mode: str, device: torch.device | str = "cpu") -> Tensor:
    """``[out_size, size]`` float32: the weights with which ``mode`` makes each output row of an axis of
    length ``size`` resized to ``out_size``, read from the op itself (the op applied to the identity, with
    the other axis left at length 1), so its index rule and border handling are the op's own.
    ``avg_pool`` is ``F.avg_pool2d`` with kernel and stride ``size // out_size`` (ToDo's pooling)."""
    eye = torch.eye(size, device=device).view(1, size, size, 1)  # channel i is the unit row i
    if mode == "avg_pool":
        kernel = size // out_size
        out = F.avg_pool2d(eye, kernel_size=(kernel, 1), stride=(kernel, 1))
    else:
        out = F.interpolate(eye, size=(out_size, 1), mode=mode)
    return out[0, :, :, 0].T


def grid_resize(
    batch: int, grid: tuple[int, int], out_grid: tuple[int, int], mode: str, device: torch.device | str = "cpu"
) -> Selection:
    """The row-major token grid ``grid = (h, w)`` resized to ``out_grid = (rows, cols)`` as
    ``F.interpolate(size=out_grid, mode=mode)`` (or ``F.avg_pool2d``, ``mode="avg_pool"``) resizes a
    ``[B, C, h, w]`` image, as a selection ``[B, h * w] -> [B, rows * cols]`` whose outputs are in the
    op's row-major order.

    Both ops are separable, so an output's weight on an input is the product of the two axes'
    :func:`resize_weights`. With ``rows <= h`` and ``cols <= w`` (and ``rows, cols <= h / 2, w / 2`` or 1
    for bilinear) every input feeds at most one output, so the map is sparse: the nearest modes a
    gather, the others weighted sums (the inputs an avg pool's kernel leaves out at the border are
    dropped). Each output inherits the position of the input it weighs most."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    for n, m in zip(grid, out_grid):
        if not 1 <= m <= n or (mode == "bilinear" and 1 < m < n and 2 * m > n):
            raise ValueError(
                f"out_grid {out_grid} must shrink grid {grid} on each axis (bilinear: to at most half, or to 1) so that "
                "every token feeds one output"
            )
        if mode == "avg_pool" and n // (n // m) != m:
            raise ValueError(f"avg_pool with kernel {n // m} pools an axis of {n} to {n // (n // m)}, not {m}")
    (slot_r, coeff_r, source_r), (slot_c, coeff_c, source_c) = (
        _axis_map(resize_weights(n, m, mode, device)) for n, m in zip(grid, out_grid)
    )
    fed = (slot_r[:, None] >= 0) & (slot_c[None, :] >= 0)
    slot = torch.where(fed, slot_r[:, None] * out_grid[1] + slot_c[None, :], -1).flatten()
    index = (source_r[:, None] * grid[1] + source_c[None, :]).flatten()
    slot, index = slot.expand(batch, -1), index.expand(batch, -1)
    if mode.startswith("nearest"):
        return Selection(slot, index, gather_only=True)
    coeff = torch.where(fed, coeff_r[:, None] * coeff_c[None, :], 0.0).flatten()
    return Selection(slot, index, coeff.expand(batch, -1))


def _axis_map(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From one axis's non-negative ``weight [m, n]`` with at most one output per input: each input's
    output ``[n]`` (-1 for none) and weight in it ``[n]``, and each output's heaviest input ``[m]``."""
    best, slot = weight.max(dim=0)
    return torch.where(best > 0, slot, -1), best, weight.argmax(dim=1)
