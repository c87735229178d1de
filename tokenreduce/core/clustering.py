"""Assigning tokens to a few targets and merging them there: VisionZip's contextual tokens, and the
clusterings of K-Medoids, DPC-kNN, Token Pooling and Expedite (distances, nearest-centre assignment,
medoid and weighted-mean updates, density peaks, local soft k-means), each batched ``[B, ...]`` with a
fixed number of steps so that they trace as one graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.pooling import adaptive_pool_matrix
from tokenreduce.core.select import stable_order
from tokenreduce.core.selection import Selection, weighted_mean_coeff


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


def dominant_contextual(picked: Tensor, metric: Tensor, contextual: int) -> Selection:
    """Keep the tokens ``picked [B, K]`` (sorted positions), then merge the others into ``contextual``
    outputs (VisionZip's dominant and contextual tokens): among the not-picked tokens in position order,
    every ``len // contextual``-th is a target (:func:`strided_targets`) and every other joins the
    target its ``metric [B, N, C]`` row is most cosine-similar to (:func:`nearest_target_merge`).
    Outputs: the ``K`` picked tokens in order, then the ``contextual`` merged ones."""
    b, n = metric.shape[:2]
    k = picked.shape[1]
    device = metric.device
    is_picked = torch.zeros(b, n, dtype=torch.bool, device=device).scatter(1, picked, True)
    # The rest in position order (a stable sort of the not-picked flags keeps it).
    rest = is_picked.to(torch.int8).argsort(dim=1, stable=True)[:, : n - k]
    slot = torch.full((b, n), -1, dtype=torch.long, device=device)
    slot = slot.scatter(1, picked, torch.arange(k, device=device).expand(b, -1))
    coeff = torch.ones(b, n, device=device)
    index = picked
    if contextual and n > k:
        targets = strided_targets(n - k, contextual, device)
        rest_slot, rest_coeff = nearest_target_merge(metric.gather(1, rest[..., None].expand(-1, -1, metric.shape[-1])), targets)
        slot = slot.scatter(1, rest, k + rest_slot)
        coeff = coeff.scatter(1, rest, rest_coeff)
        index = torch.cat([picked, rest[:, targets]], dim=1)
    return Selection(slot, index, coeff)


def pairwise_distances(x: Tensor, y: Tensor | None = None, squared: bool = False) -> Tensor:
    """Euclidean distances ``[B, N, M]`` (float32; their squares when ``squared``) between the rows of
    ``x [B, N, C]`` and ``y [B, M, C]`` (default ``x``: then the diagonal is exactly 0, so a token is
    always nearest to itself).

    Computed from the Gram matrix, as ``torch.cdist`` does for more than 25 rows, on features centred
    on the mean of ``x``'s rows (smaller norms: less cancellation); squares below 0 are clamped."""
    x = x.detach().float()
    mean = x.mean(dim=1, keepdim=True)
    a = x - mean
    b = a if y is None else y.detach().float() - mean
    dist = ((a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * (a @ b.transpose(1, 2))).clamp(min=0)
    if not squared:
        dist = dist.sqrt()
    if y is None:
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        dist = dist.masked_fill(eye, 0.0)
    return dist


def nearest_centre(dist: Tensor, seeds: Tensor | None = None) -> Tensor:
    """Assign every token to its nearest centre: ``dist [B, N, K]`` token-to-centre distances ->
    ``[B, N]`` cluster ids (ties to the lower id). ``seeds [B, K]``, the token each centre started from
    (a medoid, a density peak, a K-Means seed), are forced into their own cluster, so none is empty."""
    assignment = dist.argmin(dim=-1)
    if seeds is None:
        return assignment
    ids = torch.arange(seeds.shape[1], device=seeds.device).expand_as(seeds)
    return assignment.scatter(1, seeds, ids)


def cluster_argmin(cost: Tensor, assignment: Tensor, clusters: int) -> Tensor:
    """``[B, clusters]``: per cluster, the member with the lowest ``cost [B, N]`` (the lowest position
    on ties), for ``assignment [B, N]`` in ``[0, clusters)`` with no cluster empty."""
    member = assignment[:, :, None] == torch.arange(clusters, device=assignment.device)  # [B, N, K]
    return torch.where(member, cost[:, :, None], torch.inf).argmin(dim=1)


def medoid_costs(
    dist: Tensor,
    assignment: Tensor,
    candidate_weight: Tensor | None = None,
    member_weight: Tensor | None = None,
    within_cluster: bool = True,
) -> Tensor:
    """The cost ``[B, N]`` of each token as the medoid of its cluster:
    ``candidate_weight[i] * sum_j member_weight[j] * dist[i, j]`` over the tokens ``j`` of ``i``'s
    cluster (``within_cluster``) or over all tokens (K-Medoids of Haurum et al., whose cost is then fixed
    per token). ``dist [B, N, N]``; weights ``[B, N]`` or ``None`` for ones."""
    weighted = dist if member_weight is None else dist * member_weight[:, None, :].float()
    if within_cluster:
        weighted = torch.where(assignment[:, :, None] == assignment[:, None, :], weighted, 0.0)
    cost = weighted.sum(dim=-1)
    return cost if candidate_weight is None else cost * candidate_weight.float()


def kmedoids(
    dist: Tensor,
    init: Tensor,
    iterations: int,
    candidate_weight: Tensor | None = None,
    member_weight: Tensor | None = None,
    within_cluster: bool = True,
) -> tuple[Tensor, Tensor]:
    """K-Medoids from the token distances ``dist [B, N, N]`` and the initial medoids ``init [B, K]``:
    ``iterations`` rounds of (assign every token to its nearest medoid; each cluster's medoid becomes its
    member of lowest :func:`medoid_costs`), then a last assignment. A fixed number of rounds (a
    converged round changes nothing, so this is "at most ``iterations``").

    Returns ``(medoids [B, K], assignment [B, N])``, medoid ``k`` in cluster ``k``."""
    medoids = init
    clusters = init.shape[1]
    for _ in range(iterations):
        assignment = nearest_centre(dist.gather(2, medoids[:, None, :].expand(-1, dist.shape[1], -1)), medoids)
        cost = medoid_costs(dist, assignment, candidate_weight, member_weight, within_cluster)
        medoids = cluster_argmin(cost, assignment, clusters)
    assignment = nearest_centre(dist.gather(2, medoids[:, None, :].expand(-1, dist.shape[1], -1)), medoids)
    return medoids, assignment


def farthest_first(dist: Tensor, first: Tensor, count: int) -> Tensor:
    """``[B, count]`` initial medoids chosen greedily from ``dist [B, N, N]``: token ``first`` (a 0-d
    index, the same for every row), then repeatedly the unchosen token whose **largest** distance to the
    chosen ones is largest (Haurum et al.'s ``equal_weight`` start: max, not the usual min); ties to the
    lower position."""
    b, n, _ = dist.shape
    chosen = first.expand(b, 1)
    taken = torch.zeros(b, n, dtype=torch.bool, device=dist.device).scatter(1, chosen, True)
    spread = dist.gather(2, chosen[:, None, :].expand(b, n, 1))[..., 0]
    picks = [chosen]
    for _ in range(1, count):
        new = torch.where(taken, -torch.inf, spread).argmax(dim=1, keepdim=True)
        picks.append(new)
        taken = taken.scatter(1, new, True)
        spread = torch.maximum(spread, dist.gather(2, new[:, None, :].expand(b, n, 1))[..., 0])
    return torch.cat(picks, dim=1)


def weighted_kmeans(x: Tensor, weight: Tensor | None, init: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Weighted K-Means on ``x [B, N, C]`` with weights ``weight [B, N]`` (``None``: ones), started from
    the tokens ``init [B, K]``: ``iterations`` rounds of (assign every token to its nearest centre, each
    seed ``init[k]`` kept in cluster ``k`` so that none empties; each centre becomes the weighted mean of
    its cluster). Returns ``(assignment [B, N], coeff [B, N])`` of the last round: the centres are
    ``sum(coeff * x)`` over each cluster (``coeff = weight / cluster total``)."""
    clusters = init.shape[1]
    weight = torch.ones(x.shape[:2], device=x.device) if weight is None else weight.float()
    points = x.detach().float()
    centres = points.gather(1, init[..., None].expand(-1, -1, x.shape[-1]))
    assignment = coeff = init  # replaced in the first round (iterations >= 1)
    for step in range(iterations):
        if step:  # the centres of the last round are the caller's to compute, from (assignment, coeff)
            target = assignment[..., None].expand_as(points)
            centres = torch.zeros_like(centres).scatter_add_(1, target, coeff[..., None] * points)
        assignment = nearest_centre(pairwise_distances(x, centres, squared=True), init)
        coeff = weighted_mean_coeff(assignment, weight, clusters)
    return assignment, coeff


def density_peaks(x: Tensor, clusters: int, neighbours: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of ``x [B, N, C]`` (or one sample ``[N, C]``): density peaks with k-nearest-
    neighbour density, as TCFormer, Haurum et al.'s DPC-KNN and SparseVLM's ``cluster_and_merge``.
    Distances are Euclidean over ``sqrt(C)``; density ``exp(-mean of the squared distances to the
    nearest neighbours)`` (the token itself included); each token's distance to the nearest denser token
    (the sample's largest distance for the densest); centres the ``clusters`` tokens with the largest
    ``distance * density``, in that order; every token assigned to its nearest centre (a centre to itself).

    Returns ``(assignment [B, N], centres [B, clusters])`` (without the batch dimension for one sample).
    Of two equal densities the earlier token counts as denser, and equal centre scores go to the earlier
    token, instead of the reference's 1e-6 random noise: deterministic (with one neighbour, the token
    itself, every density is equal).
    """
    if x.dim() == 2:
        assignment, centres = density_peaks(x[None], clusters, neighbours)
        return assignment[0], centres[0]
    b, n, _ = x.shape
    score, dist = density_peak_scores(x, neighbours)
    centres = stable_order(score)[:, :clusters]
    assignment = nearest_centre(dist.gather(2, centres[:, None, :].expand(b, n, clusters)), centres)
    return assignment, centres


def density_peak_scores(x: Tensor, neighbours: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN's centre score of each token of ``x [B, N, C]``: ``density * distance to the nearest denser
    token`` (see :func:`density_peaks`, which takes the best-scored tokens as centres), and the distances
    ``[B, N, N]`` (Euclidean over ``sqrt(C)``). Returns ``(score [B, N], dist)``."""
    n, c = x.shape[1:]
    dist = pairwise_distances(x) / c**0.5
    nearest = dist.topk(min(neighbours, n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [B, N]
    order = torch.arange(n, device=x.device)
    other, this = density[:, None, :], density[:, :, None]
    denser = (other > this) | ((other == this) & (order[None, :] < order[:, None]))  # [B, i, j]: j denser than i
    parent = torch.where(denser, dist, dist.amax(dim=(1, 2), keepdim=True)).min(dim=-1).values
    return parent * density, dist


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
        logits = (-tau * pairwise_distances(matrix @ xf, xf, squared=True)).masked_fill(~allowed, float("-inf"))
        affinity = logits.softmax(dim=1)  # over the centroids
        matrix = affinity / affinity.sum(dim=2, keepdim=True).clamp(min=1e-16)
    return matrix


def cluster_selection(assignment: Tensor, centres: Tensor, num_prefix: int, coeff: Tensor | None = None) -> Selection:
    """The prefix tokens kept in front, then one output per cluster of the ``P`` tokens after them.

    ``assignment [B, P]`` gives each token's cluster, ``centres [B, K]`` (positions among the ``P``) the
    token each output inherits its position from, ``coeff [B, P]`` each token's weight in its output
    (``None``: the centre alone with weight 1 and its members with weight 0, so the output *is* the
    centre, a medoid, while its members still count in its size and are restored from it)."""
    b, p = assignment.shape
    device = assignment.device
    if coeff is None:
        coeff = (torch.arange(p, device=device) == centres.gather(1, assignment)).float()
    prefix = torch.arange(num_prefix, device=device).expand(b, -1)
    slot = torch.cat([prefix, assignment + num_prefix], dim=1)
    index = torch.cat([prefix, centres + num_prefix], dim=1)
    coeff = torch.cat([torch.ones(b, num_prefix, device=device), coeff.float()], dim=1)
    return Selection(slot, index, coeff)
