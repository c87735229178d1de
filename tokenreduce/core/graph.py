"""Token graphs: grid and nearest-neighbour adjacency over patch tokens, its symmetric normalisation,
propagating dropped tokens into their graph neighbours (GTP-ViT, Xu et al., WACV 2024), and the graph
of clusters that touch on the grid (CAT Pruning)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.select import stable_order
from tokenreduce.core.selection import Selection, mix


def grid_adjacency(rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """``[rows * cols, rows * cols]`` float, 1 between the 8 neighbours of a row-major patch grid
    (``|d_row| <= 1`` and ``|d_col| <= 1``), 0 on the diagonal."""
    index = torch.arange(rows * cols, device=device)
    r, c = index // cols, index % cols
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    return (near & (index[:, None] != index[None, :])).float()


def grid_edges(rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """``[2, E]`` long: every pair of 4-neighbours of a row-major ``rows x cols`` grid once (each token
    with its right, then with its lower neighbour), ``E = rows * (cols - 1) + (rows - 1) * cols``."""
    index = torch.arange(rows * cols, device=device).view(rows, cols)
    right = torch.stack([index[:, :-1].flatten(), index[:, 1:].flatten()])
    down = torch.stack([index[:-1].flatten(), index[1:].flatten()])
    return torch.cat([right, down], dim=1)


def label_adjacency(labels: Tensor, edges: Tensor, num_labels: int) -> Tensor:
    """``[B, K, K]`` bool: labels ``a != b`` are adjacent when an edge of ``edges [2, E]`` joins a token
    labelled ``a`` to one labelled ``b``; ``labels [B, N]`` in ``[0, K)``. Symmetric, no self loops: the
    graph left by pooling the tokens of a graph by label (torch_geometric's ``pool_edge``)."""
    b, k = labels.shape[0], num_labels
    start, end = labels[:, edges[0]], labels[:, edges[1]]  # [B, E]
    flat = torch.zeros(b, k * k, dtype=torch.bool, device=labels.device)
    flat = flat.scatter(1, start * k + end, True).scatter(1, end * k + start, True)
    return flat.view(b, k, k) & ~torch.eye(k, dtype=torch.bool, device=labels.device)


def knn_adjacency(x: Tensor, neighbours: int) -> Tensor:
    """``[B, M, M]`` float: row ``i`` is 1 at the ``neighbours`` tokens of ``x [B, M, C]`` most
    cosine-similar to token ``i``, itself excluded. As GTP-ViT's semantic graph, a row keeps every entry
    at least its ``(neighbours + 1)``-th largest similarity (itself counted), so ties may add more; the
    graph is not symmetric. Needs ``0 <= neighbours < M``."""
    m = x.shape[1]
    if not 0 <= neighbours < m:
        raise ValueError(f"neighbours must be in [0, {m - 1}] for {m} tokens, got {neighbours}")
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(-1, -2)
    threshold = sim.topk(neighbours + 1, dim=-1).values.amin(dim=-1, keepdim=True)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    return ((sim >= threshold) & ~eye).float()


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """``D^-1/2 A D^-1/2`` with ``D`` the row sums of ``adjacency [..., M, M]`` (isolated tokens keep
    zero rows and columns instead of the reference's division by zero)."""
    degree = adjacency.sum(dim=-1)
    scale = torch.where(degree > 0, degree.clamp(min=1e-12).rsqrt(), torch.zeros_like(degree))
    return adjacency * scale[..., :, None] * scale[..., None, :]


def graph_propagation(rank: Tensor, graph: Tensor, num_prop: int, alpha: float, num_prefix: int) -> tuple[Selection, Tensor]:
    """GTP-ViT's step: drop the ``num_prop`` lowest-ranked non-prefix tokens and add each, weighted by
    ``alpha`` times its graph edge, to every kept token: ``x_kept += alpha * G[kept, prop] @ x_prop``.

    Args:
        rank: ``[B, M]`` one score per non-prefix token, highest kept first.
        graph: ``[B, M, M]`` the (normalised) graph among those tokens, in their order.
        num_prop: tokens to propagate, ``0 <= num_prop <= M``.
    Returns the dense selection (prefix tokens first, unchanged; then the kept tokens by descending rank,
    ties in position order; sizes follow the same matrix, GTP's token-scale rule) and the graph among the
    kept tokens in their new order (never renormalised). Each dropped token's main output, the one its
    owners follow, is the kept neighbour with the largest edge; one without a kept neighbour is lost.
    """
    b, m = rank.shape
    n, device = m + num_prefix, rank.device
    order = stable_order(rank)
    kept, prop = order[:, : m - num_prop], order[:, m - num_prop :]
    rows = graph.gather(1, kept[:, :, None].expand(-1, -1, m))  # [B, K, M]
    weights = alpha * rows.gather(2, prop[:, None, :].expand(-1, kept.shape[1], -1)).float()  # [B, K, P]
    body = torch.zeros(b, kept.shape[1], n, device=device)
    body = body.scatter(2, prop[:, None, :].expand_as(weights) + num_prefix, weights)
    body = body.scatter(2, kept[:, :, None] + num_prefix, 1.0)
    head = torch.eye(num_prefix, n, device=device).expand(b, -1, -1)
    matrix = torch.cat([head, body], dim=1)
    prefix = torch.arange(num_prefix, device=device).expand(b, -1)
    selection = mix(matrix, index=torch.cat([prefix, kept + num_prefix], dim=1), size_matrix=matrix)
    return selection, rows.gather(2, kept[:, None, :].expand(-1, kept.shape[1], -1))
