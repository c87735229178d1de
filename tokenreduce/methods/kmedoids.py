"""``kmedoids``: K-Medoids token clustering as studied by Haurum et al. ("Which Tokens to Use? Investigating
Token Reduction in Vision Transformers", ICCV 2023 Workshops), used training-free; and the schedule it
shares with ``dpc_knn``."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from tokenreduce.core import Selection, cluster_selection, farthest_first, hash_scores, kmedoids, pairwise_distances, stable_order
from tokenreduce.methods.base import Hook, LayerContext, PruneAtLayers
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_int_tuple

COSTS = ("all", "cluster")


@dataclass
class ClusterAtLayers(PruneAtLayers):
    """Cluster the patch tokens at the start of a few blocks (Haurum et al.'s merging methods).

    ``layers=None`` clusters before blocks 3, 6 and 9 of a 12-block model (the 4th, 7th and 10th),
    scaled to the depth. The j-th clustering (0-based) leaves ``int(P0 * keep_rate ** (j + 1))`` patch
    tokens, ``P0`` the patch tokens of the input: 137, 96, 67 of 196 at ``keep_rate=0.7``. The reference
    writes ``P0`` as ``patch_embed.num_patches`` (196 at its 224 px); here it is the input's real count,
    so other resolutions and register tokens plan correctly. ``clusters`` gives the counts directly,
    one per clustering layer (the reference's ``--keep_rate`` with several values). Prefix tokens (class,
    distillation, registers) are never clustered and stay in front.
    """

    clusters: Sequence[int] | None = None

    hook: ClassVar[Hook] = Hook.START
    needs_cls_token: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clusters is not None:
            self.clusters = as_int_tuple("clusters", self.clusters, 1)

    def counts(self, patches: int, depth: int) -> dict[int, int]:
        """Patch tokens left by each clustering layer, for ``patches`` input patch tokens."""
        layers = self.reduction_layers(depth)
        if self.clusters is None:
            counts = [int(patches * self.keep_rate ** (j + 1)) for j in range(len(layers))]
            if counts[-1] < 1:
                lowest = (1 / patches) ** (1 / len(layers))
                raise ValueError(
                    f"keep_rate={self.keep_rate} leaves no patch token after {len(layers)} clusterings of {patches}; "
                    f"keep_rate must be in [{math.ceil(lowest * 1e6) / 1e6}, 1] for this input"
                )
        else:
            counts = list(self.clusters)
            if len(counts) != len(layers):
                raise ValueError(f"clusters must have one count per clustering layer {layers}, got {len(counts)}")
        left = patches
        for layer, count in zip(layers, counts):
            if count > left:
                raise ValueError(
                    f"clusters must not exceed the patch tokens there: {count} at block {layer}, which receives {left} "
                    f"(allowed 1..{left})"
                )
            left = count
        return dict(zip(layers, counts))

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        if ctx.num_out == x.shape[1]:
            return None
        return self.cluster(x[:, ctx.num_prefix :], ctx, ctx.num_out - ctx.num_prefix)

    @abstractmethod
    def cluster(self, patches: Tensor, ctx: LayerContext, k: int) -> Selection:
        """The prefix tokens, then ``k`` clusters of ``patches [B, P, C]`` (the tokens after the prefix)."""

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        counts = self.counts(num_tokens - num_prefix, depth)
        n, out = num_tokens, []
        for layer in range(depth):
            n = num_prefix + counts.get(layer, n - num_prefix)
            out.append(n)
        return out


@register_method
@dataclass
class KMedoids(ClusterAtLayers):
    """Before each clustering block, replace the patch tokens by ``K`` medoids of the hidden states.

    Algorithm (Haurum et al.'s ``k_medoids_fit``; commit 88fe07e):

    1. Weights ``w``: the attention each patch token received in the **previous** block's attention,
       summed over heads and all queries (here its mean: a constant factor, which changes no choice).
    2. Initial medoids: the ``K`` patch tokens of highest ``w``, highest first (``equal_weight=True``:
       greedily, the token at a seeded pseudo-random position, then repeatedly the token whose largest
       distance to the chosen ones is largest, the reference's max, not the usual min; its weights are
       then all 1).
    3. Euclidean distances between the hidden states (the block input ``x``), patch tokens only.
    4. ``iterations`` rounds (default 3, the reference's ``--cluster_iters``): assign every token to its
       nearest medoid; each cluster's medoid becomes its member ``i`` of lowest ``w[i] * sum_j d(i, j)``.
       **Quirk, reproduced by default** (``cost="all"``): ``j`` runs over all patch tokens, not the
       cluster (the reference masks out the rows of other clusters but sums every column), so a token's
       cost does not depend on the clustering: the member most central to the whole image, scaled by its
       weight, wins. ``cost="cluster"`` sums over the cluster only (what its comment describes).
       Note that ``w`` scales the candidate, so a highly attended token is a *costlier* medoid.
    5. A last assignment; the outputs are the medoids themselves (no averaging), in cluster order
       (the initial medoids' order), after the prefix tokens.

    Choices the reference leaves open, and departures:

    - Bookkeeping: a medoid *covers its cluster*. The selection feeds each medoid into its output with
      weight 1 and its other members with weight 0, so the output is exactly the medoid (as the
      reference's gather), while sizes count the cluster, ``record().owner`` maps each patch to its
      medoid, size-weighted average pooling counts it once per member, and ``Record.restore`` copies
      the medoid back to its members (the clustering's own reconstruction) instead of filling them
      from the nearest surviving patch of the grid.
    - Every medoid is forced into its own cluster, so no cluster empties (the reference's empty cluster
      would take token 0 as its medoid; it happens only when two tokens coincide exactly).
    - Ties (equal weights, equal distances, equal costs) go to the lower position; the reference's
      ``topk``/``argmin`` tie order is unspecified.
    - ``equal_weight``'s first token is ``hash_scores`` of ``seed`` and the layer (the reference draws
      ``np.random.choice`` per call, the same index for the whole batch, as here).
    - Distances are computed in float32 from the Gram matrix with an exact zero diagonal (as
      ``torch.cdist`` for more than 25 rows, minus its inexact self-distances).
    - Needs the previous block's attention, so a clustering layer must be >= 1 unless ``equal_weight``.
    - The reference has no proportional attention; neither has this.

    Defaults: ``keep_rate=0.7`` at blocks 3, 6, 9 (137, 96, 67 patch tokens on DeiT-S), ``iterations=3``,
    ``cost="all"``, ``equal_weight=False``. The study fine-tunes; no off-the-shelf number is published.
    """

    name = "kmedoids"
    paper = "Haurum et al., Which Tokens to Use? Investigating Token Reduction in Vision Transformers, ICCV 2023 Workshops"

    iterations: int = 3  # assignment + medoid-update rounds (the reference's --cluster_iters)
    cost: str = "all"  # medoid cost summed over all patch tokens (the reference) or over the cluster
    equal_weight: bool = False  # unweighted, greedy farthest-first start (the reference's --equal_weight)
    seed: int = 0  # the first greedy medoid with equal_weight

    def __post_init__(self) -> None:
        super().__post_init__()
        self.iterations = as_int("iterations", self.iterations, 0)
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        self.equal_weight = as_bool("equal_weight", self.equal_weight)
        self.seed = as_int("seed", self.seed, 0)
        if not self.equal_weight and self.layers is not None and 0 in self.layers:
            raise ValueError(
                "kmedoids weights tokens by the attention they received in the previous block, so layers must be "
                f">= 1 (got {list(self.layers)}); or pass equal_weight=True"
            )

    def reduction_layers(self, depth: int) -> tuple[int, ...]:
        layers = super().reduction_layers(depth)
        if not self.equal_weight and 0 in layers:
            raise ValueError(
                f"kmedoids weights tokens by the previous block's attention; the default layers at depth {depth} "
                "include block 0, which has none: pass layers >= 1 or equal_weight=True"
            )
        return layers

    def cluster(self, patches: Tensor, ctx: LayerContext, k: int) -> Selection:
        dist = pairwise_distances(patches)
        if self.equal_weight:
            first = hash_scores(patches.shape[1], self.seed * 1_000_003 + ctx.layer, patches.device).argmax()
            weight, init = None, farthest_first(dist, first, k)
        else:
            weight = ctx.received()[:, ctx.num_prefix :]
            init = stable_order(weight)[:, :k]
        within = self.cost == "cluster"
        medoids, assignment = kmedoids(dist, init, self.iterations, candidate_weight=weight, within_cluster=within)
        return cluster_selection(assignment, medoids, ctx.num_prefix)
