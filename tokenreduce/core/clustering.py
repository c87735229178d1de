"""Assigning tokens to a few targets and merging them there (VisionZip's contextual tokens, density-peaks
clusters, Expedite's local soft k-means)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.pooling import adaptive_pool_matrix


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
    """DPC-kNN clustering of ``x [N, C]`` (density peaks with k-nearest-neighbour density, as
    TCFormer and SparseVLM's ``cluster_and_merge``): density ``exp(-mean of the squared distances to
    the nearest neighbours)`` (distances scaled by ``sqrt(C)``), each token's distance to the nearest
    denser token (the largest distance for the densest), centres the ``clusters`` tokens with the
    largest ``distance * density``, every token assigned to its nearest centre (a centre to itself).

    Returns ``(assignment [N], centres [clusters])``. Of two equal densities the earlier token counts as
    denser, and equal centre scores go to the earlier token, instead of the reference's 1e-6 random
    noise: deterministic (with one neighbour, the token itself, every density is equal).
    """
    n, c = x.shape
    dist = torch.cdist(x.float()[None], x.float()[None])[0].fill_diagonal_(0) / c**0.5  # exact self-distances: they decide ties
    nearest = dist.topk(min(neighbours, n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    order = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (order[None, :] < order[:, None]))
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (parent * density).sort(descending=True, stable=True).indices[:clusters]
    assignment = dist[:, centres].argmin(dim=-1)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return assignment, centres


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``[B, M, N]`` squared L2 distances between ``a [B, M, C]`` and ``b [B, N, C]`` (float32), expanded
    as ``|a|^2 + |b|^2 - 2 a.b`` (matrix products, as Expedite's reference computes them)."""
    a, b = a.float(), b.float()
    return (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)


def grid_cells(grid: tuple[int, int], cells: tuple[int, int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The cell ``(row [P], col [P])`` of a coarse ``cells = (h, w)`` grid that each token of the row-major
    ``grid = (rows, cols)`` starts in: nearest-neighbour upsampling of the cell labels to the grid,
    computed with ``F.interpolate(mode="nearest")`` exactly as Expedite's reference does (its float
    scale can put a token one cell lower than ``floor(r * h / rows)`` on a few grids, e.g. 46 -> 14)."""

    def axis(n: int, m: int) -> Tensor:
        labels = torch.arange(m, device=device, dtype=torch.float32)[None, None]
        return F.interpolate(labels, size=n, mode="nearest")[0, 0].long()

    rows, cols = axis(grid[0], cells[0]), axis(grid[1], cells[1])
    return rows[:, None].expand(-1, grid[1]).reshape(-1), cols[None, :].expand(grid[0], -1).reshape(-1)


def local_soft_kmeans(x: Tensor, grid: tuple[int, int], cells: tuple[int, int], iters: int, window: int, tau: float) -> Tensor:
    """Expedite's token clustering: soft k-means of the tokens ``x [B, P, C]`` of a row-major ``grid``
    into the ``h * w`` centroids of ``cells = (h, w)``, each token seeing only the centroids within
    ``window // 2`` cells (rows and columns) of the cell it starts in (:func:`grid_cells`).

    Centroids start as the adaptive average pool of the grid to ``cells``; each of ``iters`` rounds
    computes ``aff = softmax over the allowed centroids of (-tau * |x - c|^2)`` and moves each centroid
    to ``sum(aff * x) / sum(aff)``. Returns ``matrix [B, h * w, P]`` (float32), with the centroids
    ``matrix @ x``: the last round's normalised affinities (the pooling matrix when ``iters == 0``).
    """
    b = x.shape[0]
    rows, cols = grid_cells(grid, cells, x.device)
    k = cells[0] * cells[1]
    centre = torch.arange(k, device=x.device)
    reach = window // 2
    allowed = ((rows[None, :] - (centre // cells[1])[:, None]).abs() <= reach) & (
        (cols[None, :] - (centre % cells[1])[:, None]).abs() <= reach
    )  # [K, P]
    matrix = adaptive_pool_matrix(grid, cells, x.device).expand(b, -1, -1)
    xf = x.float()
    for _ in range(iters):
        logits = (-tau * squared_distances(matrix @ xf, xf)).masked_fill(~allowed, float("-inf"))
        affinity = logits.softmax(dim=1)  # over the centroids
        matrix = affinity / affinity.sum(dim=2, keepdim=True).clamp(min=1e-16)
    return matrix
