"""Giving back a full patch grid from reduced tokens, for dense heads (segmentation, saliency, depth)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tokenreduce.core.clustering import pairwise_distances
from tokenreduce.core.selection import Selection


def _grid_distances(grid: tuple[int, int], device: torch.device) -> Tensor:
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([y.flatten(), x.flatten()], dim=1).float().to(device)
    return torch.cdist(coords, coords)  # [N, N]


def knn_reconstruction_weights(x: Tensor, centroids: Tensor, k: int | None, tau: float, norm: str = "l2") -> Tensor:
    """Expedite's token reconstruction weights ``[B, P, K]`` (float32): how each token of ``x [B, P, C]``
    is rebuilt from the ``centroids [B, K, C]`` it was clustered into, ``W = exp(-tau * |x - c|^2)`` kept at
    each token's ``k`` largest entries (all of them when ``k`` is None; ties with the k-th kept too) and
    normalised across the centroids: ``norm="l2"`` to unit L2 norm (the reference's ``F.normalize``),
    ``"sum"`` to sum 1. Computed from the logits (``W / |W|`` as ``exp(l - logsumexp(2 l) / 2)``), so a
    token far from every centroid keeps its weights where the reference's ``exp`` underflows to zero."""
    logits = -tau * pairwise_distances(x, centroids, squared=True)
    if k is not None and k < logits.shape[-1]:
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if norm == "sum":
        return logits.softmax(dim=-1)
    return (logits - 0.5 * torch.logsumexp(2 * logits, dim=-1, keepdim=True)).exp()


def restore_tokens(tokens: Tensor, steps: Sequence[Selection], num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Undo ``steps`` (the selections that turned ``N0`` tokens into ``tokens [B, N, C]``, in order) in
    reverse: ``[B, N0, C]``. Each selection's :meth:`~Selection.unmerge` gives back its inputs (a
    reconstruction step ends the walk: its outputs are the original tokens); patches no output covers
    take the value of the nearest covered patch on ``grid`` (the ``N0 - num_prefix`` tokens after the
    prefix), ties to the lower index."""
    start = max((i + 1 for i, s in enumerate(steps) if s.restores), default=0)
    values = tokens
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    for selection in reversed(steps[start:]):
        values = selection.unmerge(values)
        valid = (selection.slot >= 0) & valid.gather(1, selection.slot.clamp(min=0))
    patches, covered = values[:, num_prefix:], valid[:, num_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    if bool(covered.all()):
        return values
    if not bool(covered.any(dim=1).all()):
        raise ValueError("no patch of some image is covered by an output token")
    dist = _grid_distances(grid, tokens.device)[None].expand(tokens.shape[0], -1, -1)
    donor = dist.masked_fill(~covered[:, None, :], float("inf")).argmin(dim=-1)  # [B, P]: itself when covered
    filled = patches.gather(1, donor[..., None].expand(-1, -1, patches.shape[-1]))
    return torch.cat([values[:, :num_prefix], filled], dim=1)
