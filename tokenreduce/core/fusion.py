"""Norm-preserving merges: a merged token keeps the direction of its group's mean and the largest norm in
the group (MLERP, the multi-token SLERP variant of Kim et al., "Token Fusion", WACV 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection

DIVISORS = ("mean", "destination")


def rescale_to_max_norm(selection: Selection, x: Tensor, divide_by: str = "mean") -> Selection:
    """``selection`` (sparse: merges, each output a weighted mean of its inputs) with every output fed by
    two or more inputs rescaled to the largest input norm of its group.

    Args:
        selection: a sparse :class:`Selection` ``N -> M`` whose outputs are means of their groups.
        x: ``[B, N, C]`` the tokens it will be applied to (the coefficients depend on them).
        divide_by: ``"mean"`` gives MLERP, ``out = mean / ||mean|| * max_k ||x_k||``; ``"destination"``
            divides by the norm of the output's :attr:`~Selection.index` token (a merge's destination)
            before merging instead, ``out = mean / ||x_dst|| * max_k ||x_k||`` (the third-party ToFu code
            in PiToMe and OpenToMe).

    Returns the same map with data-dependent coefficients ``[B, N]`` (float32): applying it to ``x`` gives
    the rescaled tokens. Outputs fed by one input are left exactly as they were.
    """
    if selection.matrix is not None:
        raise ValueError("rescale_to_max_norm needs a sparse selection (each input feeds one output), got a dense one")
    if divide_by not in DIVISORS:
        raise ValueError(f"divide_by must be one of {DIVISORS}, got {divide_by!r}")
    b, m = selection.index.shape
    fed = selection.slot >= 0
    target = torch.where(fed, selection.slot, m)  # dropped inputs go to a spare output, cut off
    norms = x.float().norm(dim=-1)  # [B, N]
    # Norms are >= 0, so a zero start leaves each group's maximum unchanged.
    largest = norms.new_zeros(b, m + 1).scatter_reduce(1, target, norms, reduce="amax")[:, :m]
    count = norms.new_zeros(b, m + 1).scatter_add(1, target, fed.float())[:, :m]
    if divide_by == "mean":
        divisor = selection.apply(x.float()).norm(dim=-1)
    else:
        divisor = norms.gather(1, selection.index)
    scale = torch.where(count > 1, largest / divisor.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
    coeff = torch.where(fed, selection.weights() * scale.gather(1, selection.slot.clamp(min=0)), 0.0)
    return Selection(selection.slot, selection.index, coeff)
