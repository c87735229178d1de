"""Agglomerative (bottom-up hierarchical) clustering of tokens, batched in torch (ATC, Haurum et al., ECCV 2024),
and merging each cluster of tokens into one."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection, first_inputs, weighted_mean_coeff

LINKAGES = ("single", "average", "complete")


def agglomerative_clustering(distance: Tensor, num_clusters: int, linkage: str = "average") -> Tensor:
    """Cluster the ``M`` items of every row of ``distance [B, M, M]`` (symmetric) into ``num_clusters``.

    Starting from singletons, the closest two clusters are joined ``M - num_clusters`` times, cluster
    distances following ``linkage`` (Lance-Williams updates): ``single`` the closest pair of members,
    ``complete`` the farthest, ``average`` the mean over all member pairs (UPGMA). These are
    scikit-learn's ``AgglomerativeClustering(metric="precomputed", linkage=...)`` clusters (and scipy's),
    up to how exact ties are broken (here: the pair of lowest indices). A fixed number of steps, each a
    batched arg-min over the distance matrix: no data-dependent control flow.

    Returns ``root [B, M]``: for every item, the lowest index in its cluster (so every cluster is named by
    its first member).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    b, m = distance.shape[:2]
    if not 1 <= num_clusters <= m:
        raise ValueError(f"num_clusters must be in [1, {m}] for {m} items, got {num_clusters}")
    device = distance.device
    items = torch.arange(m, device=device)
    inf = torch.tensor(float("inf"), dtype=distance.dtype, device=device)
    # Cluster distances, inf on the diagonal and for clusters that were joined into another. The first
    # arg-min in row-major order is the pair whose lower index is lowest, and names it first.
    dist = torch.where(items[:, None] == items[None, :], inf, distance)
    count = torch.ones(b, m, dtype=distance.dtype, device=device)
    root = items.expand(b, -1)
    rows = torch.arange(b, device=device)
    for _ in range(m - num_clusters):
        pair = dist.flatten(1).argmin(dim=1)
        low, high = pair // m, pair % m  # low < high: the joined cluster keeps the name `low`
        d_low, d_high = dist[rows, low], dist[rows, high]  # [B, M]
        if linkage == "single":
            joined = torch.minimum(d_low, d_high)
        elif linkage == "complete":
            joined = torch.maximum(d_low, d_high)
        else:
            n_low, n_high = count[rows, low][:, None], count[rows, high][:, None]
            joined = (n_low * d_low + n_high * d_high) / (n_low + n_high)
        joined = torch.where((items == low[:, None]) | (items == high[:, None]), inf, joined)
        # Row and column `low` take the joined distances, row and column `high` leave: O(B * M) writes.
        dist = dist.clone()
        dist[rows, low] = joined
        dist[rows, :, low] = joined
        dist[rows, high] = inf
        dist[rows, :, high] = inf
        count = count.index_put((rows, low), count[rows, low] + count[rows, high])
        root = torch.where(root == high[:, None], low[:, None], root)
    return root


def merge_clusters(root: Tensor, num_clusters: int, num_prefix: int = 0, size: Tensor | None = None) -> Selection:
    """Merge the tokens after ``num_prefix`` prefix tokens by cluster, each into its size-weighted mean.

    ``root [B, M]`` names each of the ``M`` non-prefix tokens' cluster by its lowest member (an index among
    them, as :func:`agglomerative_clustering` returns; every row has ``num_clusters``). Outputs are the
    prefix tokens, then the clusters in the order of their first member, each at that member's position;
    ``size [B, P + M, 1]`` weights the means (``None``: plain means)."""
    b, m = root.shape
    device = root.device
    is_root = root == torch.arange(m, device=device)
    rank = is_root.long().cumsum(dim=1) - 1  # each first member's cluster number
    prefix = torch.arange(num_prefix, device=device).expand(b, -1)
    slot = torch.cat([prefix, num_prefix + rank.gather(1, root)], dim=1)
    num_out = num_prefix + num_clusters
    weight = torch.ones(b, num_prefix + m, device=device) if size is None else size[..., 0]
    return Selection(slot, first_inputs(slot, num_out), weighted_mean_coeff(slot, weight, num_out))
