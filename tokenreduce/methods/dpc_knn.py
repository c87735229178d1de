"""``dpc_knn``: density-peaks clustering with k nearest neighbours (TCFormer's clustering, Zeng et al.,
CVPR 2022) as a token-merging method, as studied by Haurum et al. (ICCV 2023 Workshops), used training-free."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, cluster_selection, density_peaks, weighted_mean_coeff
from tokenreduce.methods.base import LayerContext
from tokenreduce.methods.kmedoids import ClusterAtLayers
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int


@register_method
@dataclass
class DPCKNN(ClusterAtLayers):
    """Before each clustering block, merge the patch tokens into ``K`` density-peak clusters (the
    schedule of ``kmedoids``: ``int(P0 * keep_rate ** (j + 1))``, 137, 96, 67 of 196 at 0.7).

    Algorithm (Haurum et al.'s ``cluster_dpc_knn`` and ``merge_tokens``, from TCFormer; commit 88fe07e),
    on the hidden states ``x`` (the block input) of the patch tokens:

    1. ``d = cdist(x, x) / sqrt(C)``.
    2. Density ``rho_i = exp(-mean of d^2 over the k nearest tokens)``, the token itself included
       (``neighbours=5``, the reference's ``--k_neighbors``).
    3. ``delta_i``: the distance to the nearest token of higher density; the densest token gets the
       largest distance of the sample.
    4. Centres: the ``K`` tokens of largest ``rho * delta``, in that order.
    5. Every token joins its nearest centre (the first on ties); each centre its own cluster.
    6. Each output is the mean of its cluster with uniform weights (the training-free
       ``--equal_weight`` setting; trained models weight by ``exp`` of a learned score), after the prefix
       tokens, in centre order, at the centre's position.

    Departures: equal densities rank the earlier token as denser and equal centre scores go to the
    earlier token, instead of the reference's U(0, 1e-6) noise on the density (deterministic; the noise
    only decides exact ties); the mean divides by the exact member count (the reference adds 1e-6 to
    it, a relative change below 1e-6); distances in float32 with an exact zero diagonal. Prefix tokens
    are never clustered. No proportional attention (none in the reference). ``Record.restore`` copies
    each cluster's mean back to its members.

    Defaults: ``keep_rate=0.7`` at blocks 3, 6, 9 (scaled to depth), ``neighbours=5``. The study
    fine-tunes; no off-the-shelf number is published.
    """

    name = "dpc_knn"
    paper = (
        "Haurum et al., Which Tokens to Use? Investigating Token Reduction in Vision Transformers, ICCV 2023 Workshops; "
        "clustering of Zeng et al., Not All Tokens Are Equal (TCFormer), CVPR 2022"
    )

    neighbours: int = 5  # k of the k-nearest-neighbour density (the token itself is one of them)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.neighbours = as_int("neighbours", self.neighbours, 1)

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        out = super().schedule(num_tokens, num_prefix, depth)
        for layer in self.reduction_layers(depth):
            patches = (num_tokens if layer == 0 else out[layer - 1]) - num_prefix
            if self.neighbours > patches:
                raise ValueError(
                    f"neighbours must be at most the {patches} patch tokens block {layer} clusters (allowed 1..{patches}), "
                    f"got {self.neighbours}"
                )
        return out

    def cluster(self, patches: Tensor, ctx: LayerContext, k: int) -> Selection:
        assignment, centres = density_peaks(patches, k, self.neighbours)
        coeff = weighted_mean_coeff(assignment, torch.ones(assignment.shape, device=patches.device), k)
        return cluster_selection(assignment, centres, ctx.num_prefix, coeff)
