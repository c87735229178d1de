"""``token_pooling``: Token Pooling (Marin et al., "Token Pooling in Vision Transformers for Image
Classification", WACV 2023, arXiv 2110.03860), used training-free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from tokenreduce.core import Selection, cluster_selection, kmedoids, pairwise_distances, stable_order, weighted_kmeans
from tokenreduce.methods.base import Budget, EncoderMethod, Hook, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_int_tuple, as_real

ALGORITHMS = ("kmedoids", "kmeans")
REFERENCE_DEPTH = 12  # keep_rate is the per-block rate of a 12-block model, scaled to the depth


@register_method
@dataclass
class TokenPooling(EncoderMethod):
    """After each block, pool the patch tokens into ``K_l`` cluster centres that minimise the weighted
    reconstruction error ``sum_i w_i * min_j ||f_i - c_j||^2`` (the paper's asymmetric Chamfer
    divergence between the tokens ``f`` and the pooled tokens ``c``), by weighted K-Medoids (default) or
    weighted K-Means, with the significance of each token as its weight ``w``.

    The paper's rule, in its words (abstract, arXiv 2110.03860): "Our new technique accurately
    approximates a set of tokens by minimizing the reconstruction error caused by downsampling. We solve
    this optimization problem via cost-efficient clustering." Its method section could not be retrieved
    (the stored copies hold the abstract and introduction; no code was released), so the points below
    come from the spec's summary of the paper (section 18, marked unverified there):

    - Downsampling between blocks: here at the end of a block (after its MLP), on the tokens the next
      block receives.
    - Weights: significance scores, PoWER-BERT's "attention received": ``w_j = sum_h sum_i A_h[i, j]``
      over the heads and all queries of the block just run (here the mean: a constant factor, which
      changes no choice).
    - Clustering: weighted K-Medoids (at most 5 iterations, ``iterations=5``) or weighted K-Means.
    - Output: the cluster centres. For K-Medoids the centre is the medoid (a real token, weight 1; its
      members feed it with weight 0, so it is exactly the medoid while sizes, owners and
      ``Record.restore`` follow the cluster); for K-Means the significance-weighted mean of the cluster,
      the minimiser of the weighted error. ``algorithm`` picks the pair; medoid and mean are not mixed.
    - ``K_l`` per layer, which the paper finds with PoWER-BERT's retention search (trained); the
      searched values were not retrieved.

    Choices the paper leaves open (or that we could not retrieve), made here:

    - Schedule: ``tokens`` gives the patch tokens left after each block (one entry per block,
      non-increasing; an entry equal to the count before it pools nothing), PoWER-BERT's retention
      configuration. Without it, after every block but the last (pooling there saves nothing) the
      patch tokens become ``int(P0 * keep_rate ** ((l + 1) * 12 / depth))`` for block ``l``, ``P0`` the
      input's patch tokens: with ``keep_rate=0.92`` on DeiT-S, 180, 165, 152, 140, 129, 118, 109, 100,
      92, 85, 78 patch tokens after blocks 0..10, about 2.98 GMACs by the analytic model (4.60 unreduced;
      the class of EViT 0.7 at 3.03), a smooth geometric stand-in for the searched schedules.
    - ``algorithm="kmedoids"`` by default: listed first in the spec, and it computes the distances once
      (K-Means recomputes ``N x K`` of them every round).
    - Initial centres: the ``K`` most significant patch tokens (as Haurum et al.'s K-Medoids, which
      follows Token Pooling), so the clustering is deterministic; also with ``weighted=False``.
    - K-Medoids: ``iterations`` rounds of (assign every token to the nearest medoid; each cluster's
      medoid becomes its member ``i`` of lowest ``sum_{j in cluster} w_j ||f_i - f_j||^2``, the weighted
      error restricted to medoids), then a last assignment. K-Means: ``iterations`` rounds of (assign to
      the nearest centre; each centre becomes the weighted mean of its cluster); the outputs are the
      last round's centres, the weighted means of the last assignment.
    - Each centre's seed (its medoid, or the token a K-Means centre started from) stays in its own
      cluster, so no cluster empties; the output inherits the seed's position.
    - Ties go to the lower position. Distances in float32 from the Gram matrix, exact zero self-distance.
    - Prefix tokens (class, distillation, registers) are never pooled and stay in front; they count as
      queries of the significance. No proportional attention (none in what we could read of the paper).
    - The clustering's own cost (``O(N^2 C)`` distances plus ``O(N^2)`` per round) is not in the
      analytic GMAC count.

    The paper reports trained models only (DeiT: the same top-1 at 42% fewer FLOPs); an off-the-shelf
    appendix was not retrieved.
    """

    name = "token_pooling"
    budget = Budget("keep_rate", 0.0, 1.0)
    paper = "Marin et al., Token Pooling in Vision Transformers for Image Classification, WACV 2023"

    keep_rate: float = 0.92  # per-block fraction of patch tokens kept, for a 12-block model (scaled to depth)
    tokens: Sequence[int] | None = None  # patch tokens left after each block (overrides keep_rate)
    algorithm: str = "kmedoids"  # weighted K-Medoids (medoid outputs) or weighted K-Means (weighted means)
    iterations: int = 5  # clustering rounds (the paper's K-Medoids: at most 5)
    weighted: bool = True  # weight tokens by their significance (False: plain K-Medoids / K-Means)

    hook: ClassVar[Hook] = Hook.END

    def __post_init__(self) -> None:
        self.keep_rate = as_real("keep_rate", self.keep_rate, 0, 1, low_open=True)
        if self.tokens is not None:
            self.tokens = as_int_tuple("tokens", self.tokens, 1)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        self.iterations = as_int("iterations", self.iterations, 1)
        self.weighted = as_bool("weighted", self.weighted)

    def patch_counts(self, patches: int, depth: int) -> list[int]:
        """Patch tokens left after each of ``depth`` blocks, for ``patches`` input patch tokens."""
        if self.tokens is not None:
            counts = list(self.tokens)
            if len(counts) != depth:
                raise ValueError(f"tokens must have one count per block ({depth}), got {len(counts)}")
        else:
            rate = self.keep_rate ** (REFERENCE_DEPTH / depth)
            counts = [int(patches * rate ** (layer + 1)) for layer in range(depth - 1)] + [None]
            if depth > 1 and counts[-2] < 1:
                lowest = (1 / patches) ** (depth / (REFERENCE_DEPTH * (depth - 1)))
                raise ValueError(
                    f"keep_rate={self.keep_rate} leaves no patch token after block {depth - 2}; keep_rate must be in "
                    f"[{math.ceil(lowest * 1e6) / 1e6}, 1] for {patches} patch tokens and {depth} blocks"
                )
        left = patches
        for layer, count in enumerate(counts):
            if count is None:
                counts[layer] = left
            elif count > left:
                raise ValueError(
                    f"tokens must not increase: {count} after block {layer}, which receives {left} patch tokens "
                    f"(allowed 1..{left})"
                )
            left = counts[layer]
        return counts

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        return [num_prefix + count for count in self.patch_counts(num_tokens - num_prefix, depth)]

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        p, n = ctx.num_prefix, x.shape[1]
        if ctx.num_out == n:
            return None
        k = ctx.num_out - p
        significance = ctx.received()[:, p:]
        weight = significance if self.weighted else None
        init = stable_order(significance)[:, :k]
        if self.algorithm == "kmeans":
            assignment, coeff = weighted_kmeans(x[:, p:], weight, init, self.iterations)
            return cluster_selection(assignment, init, p, coeff)
        medoids, assignment = kmedoids(pairwise_distances(x[:, p:], squared=True), init, self.iterations, member_weight=weight)
        return cluster_selection(assignment, medoids, p)
