"""Assigning tokens to a few targets and merging them there (VisionZip's contextual tokens, density-peaks
clusters)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.select import descending_order


def strided_targets(num_tokens: int, num_targets: int, device: torch.device | str = "cpu") -> Tensor:
    """``num_targets`` evenly spaced positions among ``num_tokens``: every ``num_tokens // num_targets``-th
    from the first (VisionZip's choice of contextual targets)."""
    step = max(1, num_tokens // num_targets)
    return torch.arange(0, num_tokens, step, device=device)[:num_targets]


def nearest_target_merge(metric: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Send every token of ``metric [B, R, D]`` to one of the ``targets [T]`` (positions among the R).

    Returns ``(slot, coeff)``, both ``[B, R]``: target ``j`` feeds slot ``j`` with weight 1; every other
    token feeds the target it is most cosine-similar to, with weight ``1 / (tokens sent there)``. So
    each output is its target plus the mean of the tokens assigned to it (VisionZip's sum, not a mean
    over the target too); a target with none assigned stays as it was.
    """
    b, r = metric.shape[:2]
    t = targets.shape[0]
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
    nearest = (unit @ unit[:, targets].transpose(-1, -2)).argmax(dim=-1)  # [B, R]
    is_target = torch.zeros(r, dtype=torch.bool, device=metric.device).index_fill(0, targets, True)
    own = torch.full((r,), -1, dtype=torch.long, device=metric.device).index_copy(
        0, targets, torch.arange(t, device=metric.device)
    )
    slot = torch.where(is_target, own, nearest)
    sent = torch.zeros(b, t, device=metric.device).scatter_add_(1, nearest, (~is_target).float().expand(b, -1))
    coeff = torch.where(is_target, 1.0, 1.0 / sent.clamp(min=1).gather(1, nearest))
    return slot, coeff


def density_peaks(x: Tensor, clusters: int, neighbours: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of ``x [N, C]`` or of each row of a batch ``x [B, N, C]`` (density peaks with
    k-nearest-neighbour density, as TCFormer and SparseVLM's ``cluster_and_merge``): density
    ``exp(-mean of the squared distances to the nearest neighbours)`` (distances scaled by ``sqrt(C)``),
    each token's distance to the nearest denser token (the largest distance of its row for the densest),
    centres the ``clusters`` tokens with the largest ``distance * density``, every token assigned to its
    nearest centre (a centre to itself).

    Returns ``(assignment [N], centres [clusters])``, with a leading batch dimension for a batch. Of two
    equal densities the earlier token counts as denser, and equal centre scores go to the earlier token,
    instead of the reference's 1e-6 random noise: deterministic (with one neighbour, the token itself,
    every density is equal).
    """
    if x.dim() == 2:
        assignment, centres = density_peaks(x[None], clusters, neighbours)
        return assignment[0], centres[0]
    b, n, c = x.shape
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    x = x.detach().float()
    square = (x * x).sum(dim=-1)
    # Euclidean distances as cdist computes them for many rows (through a matrix product, which ONNX
    # exports), with exact self-distances: they decide ties.
    dist = (square[:, :, None] + square[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp(min=0).sqrt()
    dist = dist.masked_fill(eye, 0) / c**0.5
    nearest = dist.topk(min(neighbours, n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [B, N]
    order = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (order[None, :] < order[:, None])
    )  # [B, i, j]: token j is denser than token i
    parent = torch.where(denser, dist, dist.amax(dim=(1, 2), keepdim=True)).min(dim=-1).values
    centres = descending_order(parent * density)[:, :clusters]
    assignment = dist.gather(2, centres[:, None, :].expand(-1, n, -1)).argmin(dim=-1)
    assignment = assignment.scatter(1, centres, torch.arange(clusters, device=x.device).expand(b, -1))
    return assignment, centres
